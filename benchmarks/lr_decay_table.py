"""The schedule's learning rate against its weight decay: a 2 x 2 table for MuLAN's per-pixel schedule and for
learned VDM, from the per-image files of a `mulan_vs_vdm.py` screen (paired by image, one training seed).

AdamW decays a parameter by lr x weight_decay per step, so the schedule at 10x the learning rate with the
default weight decay (0.01) also decays 10x faster; `train.schedule_weight_decay=0.001` restores 1x decay at 10x
lr, and 0.1 gives 10x decay at 1x lr. Each cell is paired to the same model family at 1x lr and 1x decay; the
last column is MuLAN's configuration minus learned VDM's in the same cell.

    python benchmarks/lr_decay_table.py benchmarks/results/mulan_vs_vdm/digits-screen-val/per_image --seed 0 --step 2500
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from mulan.compare import paired_difference, read_per_image

# (lr scale, decay per step relative to the rest of the network) -> the screen's configuration names
CELLS = {(1, 1): ("ends-map-lr1", "vdm"), (1, 10): ("ends-map-lr1-wd10x", "vdm-wd10x"),
         (10, 1): ("ends-map-wd1x", "vdm-lr10-wd1x"), (10, 10): ("ends-map", "vdm-lr10")}


def decayed_ends(lr: float, steps: int, warmup: int, rate: float, ends=(-13.3, 5.0)) -> tuple[float, float]:
    """Where learned ends gamma(0) = b, gamma(1) = b + |w| go under weight decay alone (a zero gradient)."""
    total = sum(lr * min(1.0, (s + 1) / warmup) for s in range(steps))
    f = math.exp(-rate * total)
    return ends[0] * f, ends[0] * f + (ends[1] - ends[0]) * f


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("per_image", type=Path)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--step", type=int, default=2500)
    p.add_argument("--split", default="val")
    args = p.parse_args()
    read = lambda name: read_per_image(args.per_image / f"{name}-s{args.seed}-step{args.step}-{args.split}.csv")
    base = {k: read(v) for k, v in zip(("mulan", "vdm"), CELLS[(1, 1)])}
    print(f"| schedule lr | schedule decay per step | ends under decay alone (γ(0), γ(1)) | MuLAN bits/dim | "
          f"− its 1x/1x | learned VDM bits/dim | − its 1x/1x | MuLAN − VDM (paired) |")
    print("|---|---|---|---|---|---|---|---|")
    for (lr, decay), (mulan, vdm) in CELLS.items():
        m, v = read(mulan), read(vdm)
        g0, g1 = decayed_ends(1e-3, args.step, 100, 0.01 * decay)
        cells = []
        for run, ref in ((m, base["mulan"]), (v, base["vdm"])):
            d = paired_difference(run, ref)
            cells.append(f"{float(run.bpd.mean()):.4f} | " + ("reference" if (lr, decay) == (1, 1) else
                                                              f"{d.mean:+.4f} ± {d.ci95:.4f}"))
        d = paired_difference(m, v)
        print(f"| {lr}x | {decay}x | ({g0:.2f}, {g1:.2f}) | {cells[0]} | {cells[1]} | {d.mean:+.4f} ± {d.ci95:.4f} |")


if __name__ == "__main__":
    main()
