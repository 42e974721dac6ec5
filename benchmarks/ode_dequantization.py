"""How many importance samples K the ODE likelihood needs, and what Hutchinson noise does to K > 1.

The ODE bound on -log P(x) is -log mean_k p_0(y_k) / q(y_k | x) over K dequantized points y_k ~ q inside x's bin
(truncated normal scaled by sigma_0, i-DODE; the paper uses K = 20). K = 1 charges the whole gap
E_q[log q/p] - (-log P) (a KL from q to the model's posterior over the bin); more samples shrink it. With a
Hutchinson estimate of log p_0 (unbiased, but noisy), the log-mean-exp over K > 1 is biased low (Jensen on the
noise), so the bound looks better than it is; exact divergence has no such noise.

This script, on one checkpoint and the first test images: (1) the ELBO as a yardstick; (2) the ODE bound with
K = 1, 8, 20 (Hutchinson, one Rademacher probe per solve), the K draws nested (the first 8 of the 20 are the K = 8
draws, image by image) so the K columns differ only by K; (3) on a few images, the same dequantized points
with exact divergence and with Hutchinson, K = 1 and K = 8: the difference is the Hutchinson bias.

    python benchmarks/ode_dequantization.py CKPT --images 64 --exact-images 4 --threads 2
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

import mulan
from mulan.data import load_splits
from mulan.diffusion import bits_per_dim
from mulan.likelihood.dequantize import dequantize
from mulan.likelihood.elbo import elbo_per_image
from mulan.likelihood.ode import ode_log_likelihood
from mulan.likelihood.stats import mean_ci


def log_weights(model, x, k_max: int, divergence: str, tol: float, seed: int) -> tuple[torch.Tensor, float]:
    """(K, B) log p_0(y_k) - log q(y_k|x) in nats for k < k_max, and the mean NFE; dequantization draws come from
    their own generator (the same points whatever the divergence), probes from another."""
    deq_gen = torch.Generator().manual_seed(seed)
    probe_gen = torch.Generator().manual_seed(seed + 1)
    cond = model.condition(x, strict=True)
    rows, nfes = [], []
    for _ in range(k_max):
        d = dequantize(x, model.num_values, cond.bound, kind="truncnorm", generator=deq_gen)
        res = ode_log_likelihood(d.y.float(), cond.eps_fn, cond.bound, rtol=tol, atol=tol,
                                 divergence=divergence, generator=probe_gen)
        rows.append(res.logp.double() - d.log_q)
        nfes.append(res.nfe)
    return torch.stack(rows), sum(nfes) / len(nfes)


def nll_bpd(log_w: torch.Tensor, k: int, latent_nats: torch.Tensor, n: int) -> torch.Tensor:
    """Per-image bits/dim of the bound with the first k importance samples, the strict latent KL added."""
    nats = -(torch.logsumexp(log_w[:k], 0) - math.log(k)) + latent_nats
    return bits_per_dim(nats, n)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint")
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--exact-images", type=int, default=4)
    p.add_argument("--ks", type=int, nargs="*", default=[1, 8, 20])
    p.add_argument("--exact-ks", type=int, nargs="*", default=[1, 8])
    p.add_argument("--tol", type=float, default=1e-5)
    p.add_argument("--time-points", type=int, default=128)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="", help="JSON file for the results")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = mulan.load(args.checkpoint)  # EMA weights, eval mode
    model, cfg = loaded.model, loaded.config
    _, test = load_splits(cfg.data)
    x_all = test.images[:args.images]
    n = model.n
    out = {"checkpoint": args.checkpoint, "step": loaded.step, "images": int(x_all.shape[0]),
           "command": sys.argv, "threads": torch.get_num_threads(), "tol": args.tol}

    t0 = time.perf_counter()
    elbo = elbo_per_image(model, x_all, time_points=args.time_points, seed=args.seed)
    out["elbo"] = {"bpd": mean_ci(elbo.bpd(n)), "time_points": args.time_points, "wall_s": time.perf_counter() - t0}

    with torch.no_grad():
        latent = model.condition(x_all, strict=True).latent.kl.double()
    t0 = time.perf_counter()
    parts, nfe = [], []
    for i in range(0, x_all.shape[0], args.batch):
        lw, f = log_weights(model, x_all[i:i + args.batch], max(args.ks), "hutchinson", args.tol, args.seed + i)
        parts.append(lw)
        nfe.append(f)
    log_w = torch.cat(parts, 1)
    wall = time.perf_counter() - t0
    out["hutchinson"] = {str(k): mean_ci(nll_bpd(log_w, k, latent, n)) for k in args.ks}
    out["hutchinson_wall_s"], out["hutchinson_mean_nfe"] = wall, sum(nfe) / len(nfe)
    # paired: how much each extra sample buys, image by image
    base = nll_bpd(log_w, args.ks[0], latent, n)
    out["hutchinson_gain_vs_first_k"] = {str(k): mean_ci(nll_bpd(log_w, k, latent, n) - base) for k in args.ks[1:]}

    out["exact"] = {}
    if args.exact_images > 0:
        x = x_all[:args.exact_images]
        t0 = time.perf_counter()
        lw_exact, nfe_exact = log_weights(model, x, max(args.exact_ks), "exact", args.tol, args.seed)
        out["exact_wall_s"], out["exact_mean_nfe"] = time.perf_counter() - t0, nfe_exact
        lw_hutch, _ = log_weights(model, x, max(args.exact_ks), "hutchinson", args.tol, args.seed)
        lat = latent[:args.exact_images]
        for k in args.exact_ks:
            e, h = nll_bpd(lw_exact, k, lat, n), nll_bpd(lw_hutch, k, lat, n)
            out["exact"][str(k)] = {"exact": mean_ci(e), "hutchinson": mean_ci(h), "hutchinson_minus_exact": mean_ci(h - e)}
    print(f"{args.checkpoint} (step {out['step']}): first {out['images']} test images, bits/dim, 95% CI over images; "
          f"ODE rtol = atol = {args.tol}, truncated-normal dequantization, strict latent KL; "
          f"{out['threads']} threads\n")
    print("| estimator | K | images | bits/dim (95% CI) | paired change vs K = 1 |")
    print("|---|---|---|---|---|")
    m, h = out["elbo"]["bpd"]
    print(f"| ELBO, S = {args.time_points} | - | {out['images']} | {m:.4f} ± {h:.4f} | |")
    for k in args.ks:
        m, h = out["hutchinson"][str(k)]
        gain = out["hutchinson_gain_vs_first_k"].get(str(k))
        print(f"| ODE, Hutchinson | {k} | {out['images']} | {m:.4f} ± {h:.4f} | "
              f"{'' if gain is None else f'{gain[0]:+.4f} ± {gain[1]:.4f}'} |")
    for k in out["exact"] and args.exact_ks:
        r = out["exact"][str(k)]
        print(f"| ODE, exact divergence | {k} | {args.exact_images} | {r['exact'][0]:.4f} ± {r['exact'][1]:.4f} | |")
        print(f"| ODE, Hutchinson, same points | {k} | {args.exact_images} | {r['hutchinson'][0]:.4f} ± {r['hutchinson'][1]:.4f} | "
              f"Hutchinson - exact: {r['hutchinson_minus_exact'][0]:+.4f} ± {r['hutchinson_minus_exact'][1]:.4f} |")
    print(f"\nwall: Hutchinson {out['hutchinson_wall_s']:.0f} s ({out['hutchinson_mean_nfe']:.0f} NFE per solve)"
          + (f", exact {out['exact_wall_s']:.0f} s ({out['exact_mean_nfe']:.0f} NFE per solve)" if out["exact"] else ""))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
