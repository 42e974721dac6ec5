"""How often a 2-rank gloo job's rank aborts at exit: the SIGABRT of issue 10, reproduced and counted.

    python benchmarks/gloo_exit_check.py MODE JOBS [--switch-interval S]

Each job forks two ranks from this already-imported interpreter (so a job costs no torch import; each child
leaves through the interpreter's normal finalization) that do what ``torchrun -m mulan train`` does at its
end: DistributedDataParallel training steps, the sharded evaluation's all_gathers, then rank 1 leaves while
rank 0 keeps working (sampling, figures), then each tears its group down.

MODE ``bare`` joins and leaves with ``torch.distributed`` directly, as mulan did before; ``mulan`` uses
:func:`mulan.distributed.setup` / :func:`~mulan.distributed.teardown`. The script counts ranks that die by a
signal. ``--switch-interval`` lengthens CPython's GIL switch interval (default 5 ms): a gloo worker that
waits for the GIL then waits longer, which widens the race window without changing what races (on a busy
machine, scheduling delays do the same). Linux only (os.fork, a file:// rendezvous).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback

import torch
import torch.distributed as dist


def gather(values: torch.Tensor) -> torch.Tensor:
    """mulan's World.gather: the tensors handed to gloo die with this frame."""
    parts = [torch.empty_like(values) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, values)
    return torch.cat(parts)


def rank_main(mode: str, rank: int, store: str, switch_interval: float) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2")
    if mode == "mulan":
        from mulan import distributed

        distributed.setup("cpu", init_method=f"file://{store}")
    else:
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    net = torch.nn.Linear(16, 16)
    ddp = torch.nn.parallel.DistributedDataParallel(net)  # its constructor imports torch._dynamo
    for _ in range(2):
        ddp(torch.randn(8, 16)).square().mean().backward()
    del ddp
    sys.setswitchinterval(switch_interval)
    for _ in range(3):
        gather(torch.randn(64))
    if rank == 0:  # rank 0 goes on working while rank 1 leaves
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < 0.3:
            torch.randn(64, 64) @ torch.randn(64, 64)
    if mode == "mulan":
        distributed.teardown()
    else:
        dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("mode", choices=["bare", "mulan"])
    p.add_argument("jobs", type=int)
    p.add_argument("--switch-interval", type=float, default=0.005)
    args = p.parse_args()
    torch.set_num_threads(1)
    died = {}
    t_start = time.time()
    tmp = tempfile.mkdtemp()  # not a context manager: a child leaving by SystemExit must not remove it
    for job in range(args.jobs):
        pids = []
        for rank in range(2):
            pid = os.fork()
            if pid == 0:
                err = os.open(f"{tmp}/err.{rank}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
                os.dup2(err, 2)
                try:
                    rank_main(args.mode, rank, f"{tmp}/store.{job}", args.switch_interval)
                except BaseException:
                    traceback.print_exc()
                    os._exit(3)
                sys.exit(0)  # through the interpreter's finalization, as a torchrun rank ends
            pids.append(pid)
        for rank, pid in enumerate(pids):
            _, status = os.waitpid(pid, 0)
            if os.WIFSIGNALED(status) or os.WEXITSTATUS(status):
                what = (signal.Signals(os.WTERMSIG(status)).name if os.WIFSIGNALED(status)
                        else f"exit {os.WEXITSTATUS(status)}")
                lines = open(f"{tmp}/err.{rank}").read().strip().splitlines()
                died[what] = died.get(what, 0) + 1
                print(f"job {job} rank {rank}: {what}: {lines[-1] if lines else ''}", flush=True)
    shutil.rmtree(tmp)
    summary = ", ".join(f"{n} {what}" for what, n in died.items()) or "no rank died"
    print(f"{args.mode}: {summary} in {args.jobs} jobs ({2 * args.jobs} ranks), switch interval "
          f"{args.switch_interval} s, {time.time() - t_start:.0f} s")


if __name__ == "__main__":
    main()
