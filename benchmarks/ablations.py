"""MuLAN against the VDM family and MuLAN's ablations, on the bundled digits, one table.

Every model gets the same denoiser, steps, batch, learning rate and seed (the digits presets differ only in
the schedule and the latent). For each: the held-out negative ELBO on the whole test split (EMA weights,
S stratified times per image, strict latent KL charged) with a 95% interval over images, its paired
difference to learned VDM (the same per-image times and noise for every model, 95% interval of the per-image
differences), the latent's cost, parameter counts, and seconds per training step measured in interleaved
rounds on one fixed batch.

    python benchmarks/ablations.py                      # the README's table (about 25 min on 2 cores)
    python benchmarks/ablations.py --steps 200 --time-points 16   # a quick look
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from mulan.config import apply_overrides
from mulan.compare import PerImage, paired_difference
from mulan.diffusion import build_model
from mulan.presets import get_preset, latent_cost_bpd
from mulan.report import measure_elbo, write_per_image, write_summary
from mulan.train import train, train_step

PRESETS = ["digits-fixed", "digits-vdm", "digits-mulan", "digits-mulan-no-latent", "digits-mulan-scalar",
           "digits-mulan-nonadaptive"]


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def step_seconds(configs: dict, rounds: int, steps: int) -> dict[str, float]:
    """Median seconds per optimisation step, presets interleaved round by round to share the machine's drift."""
    models = {name: build_model(cfg).train() for name, cfg in configs.items()}
    opts = {name: torch.optim.AdamW(m.parameters(), lr=1e-4) for name, m in models.items()}
    x = torch.randint(0, 17, (next(iter(configs.values())).train.batch_size, 1, 8, 8))
    times: dict[str, list[float]] = {name: [] for name in configs}
    for r in range(rounds + 1):
        for name, m in models.items():
            gen = torch.Generator().manual_seed(r)
            t0 = time.perf_counter()
            for _ in range(steps):
                train_step(m, opts[name], x, generator=gen, grad_clip=1.0)
            if r > 0:  # round 0 warms up
                times[name].append((time.perf_counter() - t0) / steps)
    return {name: statistics.median(v) for name, v in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=0, help="training steps (default: the presets')")
    p.add_argument("--time-points", type=int, default=128, help="S stratified times per test image")
    p.add_argument("--out", default="runs/bench-ablations")
    p.add_argument("--presets", nargs="*", default=PRESETS)
    p.add_argument("--timing-rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    extra = [f"train.steps={args.steps}"] if args.steps else []
    configs = {name: apply_overrides(get_preset(name), [*extra, "train.eval_every=0"]) for name in args.presets}
    sec = step_seconds(configs, args.timing_rounds, steps=5)
    rows, per_image = [], {}
    for name, cfg in configs.items():
        out = Path(args.out) / name
        if (out / "checkpoints" / "last.pt").exists():
            sys.exit(f"{out} already holds a run: remove it or pass another --out")
        result = train(cfg, out)
        # one eval seed for every preset: common per-image draws, so the differences below are paired
        ev, columns = measure_elbo(result.model, result.test_set, time_points=args.time_points,
                                   batch_size=cfg.eval.batch_size, seed=0,
                                   checkpoint=str(out / "checkpoints" / "last.pt"), step=result.step, weights="ema")
        write_per_image(out / f"{ev.stem}.csv", columns)
        write_summary(out / f"{ev.stem}.json", ev)
        per_image[name] = PerImage(bpd=columns["bpd"].double(), terms={}, summary={}, source=str(out))
        m = result.model
        rows.append({
            "preset": name, "bpd": ev.bpd, "ci95": ev.ci95, "latent_bpd": ev.latent_bpd, "latent_kl": ev.latent_kl,
            "latent_cost_strict_bpd": latent_cost_bpd(cfg), "diffusion_bpd": ev.terms_bpd["diffusion"],
            "params_total": count(m), "params_denoiser": count(m.denoiser), "params_schedule": count(m.schedule),
            "params_encoder": count(m.latent), "s_per_step": sec[name], "steps": cfg.train.steps,
            "images": ev.images, "time_points": args.time_points,
        })
        print(f"{name}: {ev.bpd:.4f} ± {ev.ci95:.4f} bits/dim", flush=True)
    vdm = next((r for r in rows if r["preset"] == "digits-vdm"), None)
    for r in rows:
        if vdm and r is not vdm:
            d = paired_difference(per_image[r["preset"]], per_image["digits-vdm"])
            r.update(diff_vdm=d.mean, diff_vdm_ci95=d.ci95, lower_than_vdm=d.a_lower)
    cfg0 = next(iter(configs.values()))
    print(f"\nDigits (8x8, V=17), test split {rows[0]['images']} images, negative ELBO with S={args.time_points} "
          f"stratified times per image drawn per image from eval seed 0 (the same for every preset), EMA weights, "
          f"strict latent KL; {cfg0.train.steps} steps of batch {cfg0.train.batch_size}, seed {cfg0.train.seed}; "
          f"{torch.get_num_threads()} threads.\n")
    print("| preset | bits/dim (95% CI) | - learned VDM, paired (95% CI) | lower on | of which latent | "
          "params (denoiser / schedule / encoder) | s/step | vs learned VDM step |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = f"{r['s_per_step'] / vdm['s_per_step']:.2f}x" if vdm else "-"
        paired = (f"{r['diff_vdm']:+.4f} ± {r['diff_vdm_ci95']:.4f} | {100 * r['lower_than_vdm']:.0f}%"
                  if "diff_vdm" in r else "reference | ")
        print(f"| {r['preset']} | {r['bpd']:.4f} ± {r['ci95']:.4f} | {paired} | {r['latent_bpd']:.4f} | "
              f"{r['params_total']:,} ({r['params_denoiser']:,} / {r['params_schedule']:,} / {r['params_encoder']:,}) | "
              f"{r['s_per_step']:.3f} | {ratio} |")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "ablations.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
