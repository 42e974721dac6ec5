"""Training throughput against the machine's own matrix-multiply peak (issue "Scale out and speed up").

For each preset and mode (eager fp32, bf16 autocast, torch.compile), one training step (forward, backward,
clipping, AdamW) on random images of the preset's shape is timed, its FLOPs are counted with
``torch.utils.flop_counter.FlopCounterMode``, and the achieved FLOP/s is set against the matmul peak
**measured in the same run** (a large fp32 and bf16 matmul). The profiler's view of one step gives the share of
time spent in matmul/convolution kernels; the rest (normalisation, activations, element-wise ELBO arithmetic,
the optimizer) is memory-bound and caps the achievable fraction of peak. Peak memory is the process's maximum
resident set on CPU (each measurement runs in its own process) and ``torch.cuda.max_memory_allocated`` on GPU.
With ``--ddp`` it also times `mulan train` on digits as 1 process with 2 threads vs 2 torchrun processes with
1 thread each.

    python benchmarks/throughput.py                          # CPU defaults (a few minutes on 2 cores)
    python benchmarks/throughput.py --modes eager,bf16,compiled --ddp
    python benchmarks/throughput.py --device cuda --cifar-batch 128 --steps 20   # on a GPU

Prints one table (and writes JSON with --json).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time

import torch


def matmul_peak(device: torch.device, dtype: torch.dtype, seconds: float = 2.0) -> float:
    """Achieved FLOP/s of a large square matmul (the machine's practical peak for ``dtype``)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    n, limit = 512, (4096 if device.type == "cpu" else 8192)
    while True:  # grow the size until one product takes a measurable time (slow dtypes stop early)
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        a @ b
        sync()
        t0 = time.perf_counter()
        a @ b
        sync()
        if n >= limit or time.perf_counter() - t0 > 0.1:
            break
        n *= 2
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        reps += 1
        sync()
    return 2 * n**3 * reps / (time.perf_counter() - t0)


MATMUL_OPS = ("conv", "mm", "matmul", "linear", "bmm", "baddbmm", "addmm", "scaled_dot_product", "mkldnn")


def measure_one(preset: str, mode: str, batch: int, steps: int, device_name: str, threads: int) -> dict:
    """Time one configuration (run in its own process by the driver)."""
    from torch.utils.flop_counter import FlopCounterMode

    from mulan.config import apply_overrides
    from mulan.diffusion import build_model
    from mulan.presets import get_preset
    from mulan.train import train_step

    if threads:
        torch.set_num_threads(threads)
    device = torch.device(device_name)
    if device.type == "cuda":  # fp32 means fp32: no TF32 behind the measurement
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    name, *overrides = preset.split("+")  # e.g. cifar10-mulan+model.schedule.decoder=lowrank
    cfg = apply_overrides(get_preset(name), [*overrides, f"train.batch_size={batch}"])
    torch.manual_seed(0)
    model = build_model(cfg).to(device)
    model.set_runtime(amp_dtype=torch.bfloat16 if mode == "bf16" else None,
                      channels_last=mode == "channels_last")
    if mode == "compiled":
        model.denoiser.compile()
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, cfg.data.num_values, (batch, *cfg.data.shape), device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step(i: int) -> None:
        train_step(model, opt, x, generator=torch.Generator(device).manual_seed(i), grad_clip=1.0)

    t_compile = time.perf_counter()
    step(0)  # warm-up (and compilation)
    step(1)
    sync()
    t_compile = time.perf_counter() - t_compile
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(steps):
        sync()
        t0 = time.perf_counter()
        step(2 + i)
        sync()
        times.append(time.perf_counter() - t0)
    times.sort()
    step_s = times[len(times) // 2]  # median
    with FlopCounterMode(display=False) as counter:
        step(100)
    flops = counter.get_total_flops()
    share = None
    if mode != "compiled":  # kernel names of compiled graphs are fused; the share is not comparable
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=acts) as prof:
            step(101)
            sync()
        events = prof.key_averages()
        attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
        if device.type == "cuda" and not hasattr(events[0], attr):
            attr = "self_cuda_time_total"
        total = sum(getattr(e, attr) for e in events)
        mm = sum(getattr(e, attr) for e in events if any(k in e.key.lower() for k in MATMUL_OPS))
        share = mm / total if total else None
    if device.type == "cuda":
        peak_mem = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mem = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB (Linux)
    return {"preset": preset, "mode": mode, "batch": batch, "step_s": step_s, "images_per_s": batch / step_s,
            "flops_per_step": flops, "flops_per_s": flops / step_s, "matmul_share": share,
            "peak_mem_mib": peak_mem, "warmup_s": t_compile,
            "params": sum(p.numel() for p in model.parameters())}


def run_one(args, preset: str, mode: str, batch: int) -> dict | None:
    cmd = [sys.executable, __file__, "--one", json.dumps([preset, mode, batch]), "--steps", str(args.steps),
           "--device", args.device, "--threads", str(args.threads)]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        print(f"  {preset} {mode}: over --timeout {args.timeout} s, skipped", file=sys.stderr)
        return {"preset": preset, "mode": mode, "batch": batch, "timed_out": True}
    if res.returncode != 0:
        print(f"  {preset} {mode}: failed: {res.stderr.strip().splitlines()[-1] if res.stderr.strip() else '?'}",
              file=sys.stderr)
        return None
    return json.loads(res.stdout.strip().splitlines()[-1])


def ddp_comparison(steps: int) -> list[dict]:
    """`mulan train` on digits-mulan: 1 process x 2 threads vs torchrun 2 processes x 1 thread."""
    rows = []
    common = ["--preset", "digits-mulan", "--no-progress", "--quick", f"train.steps={steps}", "train.eval_every=0",
              "train.device=cpu", "model.denoiser.dropout=0.0"]
    for name, launch, threads in (
        ("1 process x 2 threads", [sys.executable, "-m", "mulan"], 2),
        # --standalone: the rendezvous binds port 0, no fixed port for another job to hold
        ("2 processes x 1 thread (torchrun, gloo)",
         [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "mulan"], 1),
    ):
        with tempfile.TemporaryDirectory() as tmp:
            env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
            res = subprocess.run([*launch, "train", *common, "--out", f"{tmp}/run", f"train.threads={threads}"],
                                 capture_output=True, text=True, env=env)
            m = re.search(r"\(([\d.]+) images/s", res.stdout)
            rows.append({"setup": name, "images_per_s": float(m.group(1)) if m else float("nan"),
                         "ok": res.returncode == 0})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", default="digits-vdm,digits-mulan,cifar10-vdm,cifar10-mulan",
                   help="comma list; PRESET+KEY=VALUE+... adds overrides, e.g. cifar10-mulan+model.schedule.decoder=lowrank")
    p.add_argument("--modes", default="eager,bf16", help="comma list of eager, bf16, compiled, channels_last")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=3, help="timed steps per configuration (median reported)")
    p.add_argument("--digits-batch", type=int, default=128)
    p.add_argument("--cifar-batch", type=int, default=4, help="paper size is 128 (use it on a GPU)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--ddp", action="store_true", help="also compare 2-process DDP with 1 process on digits")
    p.add_argument("--ddp-steps", type=int, default=150)
    p.add_argument("--timeout", type=float, default=600, help="seconds per configuration before it is skipped")
    p.add_argument("--json", help="write all rows here")
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        preset, mode, batch = json.loads(args.one)
        print(json.dumps(measure_one(preset, mode, batch, args.steps, args.device, args.threads)))
        return

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
    peaks = {"fp32": matmul_peak(device, torch.float32), "bf16": matmul_peak(device, torch.bfloat16)}
    hw = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"# {hw}; torch {torch.__version__}; measured matmul peak: fp32 {peaks['fp32'] / 1e9:.1f} GFLOP/s, "
          f"bf16 {peaks['bf16'] / 1e9:.1f} GFLOP/s")
    rows = []
    for preset in args.presets.split(","):
        batch = args.digits_batch if preset.startswith("digits") else args.cifar_batch
        for mode in args.modes.split(","):
            row = run_one(args, preset, mode, batch)
            if row is not None and row.get("timed_out"):
                rows.append(row)
            elif row is not None:
                row["peak_fraction"] = row["flops_per_s"] / peaks["bf16" if mode == "bf16" else "fp32"]
                rows.append(row)
                print(f"  measured {preset} {mode}: {row['step_s']:.3f} s/step", file=sys.stderr)

    head = ("| preset | mode | batch | params | s/step | images/s | GFLOP/step | GFLOP/s | of matmul peak "
            "| matmul+conv share | peak MiB |")
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for r in rows:
        if r.get("timed_out"):
            print(f"| {r['preset']} | {r['mode']} | {r['batch']} | over {args.timeout:.0f} s: not measured |||||||")
            continue
        share = f"{100 * r['matmul_share']:.0f}%" if r["matmul_share"] is not None else "n/a"
        print(f"| {r['preset']} | {r['mode']} | {r['batch']} | {r['params'] / 1e6:.2f}M | {r['step_s']:.3f} "
              f"| {r['images_per_s']:.1f} | {r['flops_per_step'] / 1e9:.1f} | {r['flops_per_s'] / 1e9:.1f} "
              f"| {100 * r['peak_fraction']:.0f}% | {share} | {r['peak_mem_mib']:.0f} |")
    by = {(r["preset"], r["mode"]): r for r in rows if not r.get("timed_out")}
    for family in ("digits", "cifar10"):
        for mode in args.modes.split(","):
            v = by.get((f"{family}-vdm", mode))
            for (preset, m_mode), m in by.items():
                if v and m_mode == mode and preset.startswith(f"{family}-mulan"):
                    print(f"MuLAN/VDM step-time ratio, {preset} vs {family}-vdm, {mode}: {m['step_s'] / v['step_s']:.2f}")
    ddp = []
    if args.ddp:
        ddp = ddp_comparison(args.ddp_steps)
        print("| digits-mulan training | images/s |\n|---|---|")
        for r in ddp:
            print(f"| {r['setup']} | {r['images_per_s']:.0f}{'' if r['ok'] else ' (failed)'} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"hardware": hw, "torch": torch.__version__, "peaks": peaks, "rows": rows, "ddp": ddp}, f,
                      indent=2)


if __name__ == "__main__":
    main()
