"""Data parallelism: split batches draw what the whole batch draws; 2 gloo processes train and evaluate as 1.

The torchrun tests start real processes (`python -m torch.distributed.run`, which is what `torchrun` runs).
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import TINY, model_that_matters, perturb, tiny
import mulan as mulan_pkg
from mulan import rng
from mulan.checkpoint import load_checkpoint
from mulan.diffusion import build_model
from mulan.distributed import World
from mulan.errors import ConfigError
from mulan.rng import ShardedGenerator
from mulan.train import train


def losses(run_dir: Path) -> list[float]:
    return [r["loss_bpd"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if r["kind"] == "train"]


# --- sharded draws ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("count", [2, 3, 4])
def test_sharded_draws_are_slices_of_the_whole_batch_draws(count):
    b = 5
    whole = {
        "randn": rng.randn((b * count, 3, 2), torch.Generator().manual_seed(1)),
        "rand": rng.rand((b * count, 7), torch.Generator().manual_seed(1)),
        "gamma": rng.standard_gamma((4, b * count, 6), 0.25, torch.Generator().manual_seed(1), batch_dim=1),
        "times": rng.antithetic_times(b * count, torch.Generator().manual_seed(1)),
    }
    for i in range(count):
        def g():
            return ShardedGenerator(torch.Generator().manual_seed(1), i, count)
        part = slice(i * b, (i + 1) * b)
        assert torch.equal(rng.randn((b, 3, 2), g()), whole["randn"][part])
        assert torch.equal(rng.rand((b, 7), g()), whole["rand"][part])
        assert torch.equal(rng.standard_gamma((4, b, 6), 0.25, g(), batch_dim=1), whole["gamma"][:, part])
        assert torch.equal(rng.antithetic_times(b, g()), whole["times"][part])


def zero_output(model) -> None:
    """The denoiser's last layer back to zero (an untrained network's eps_hat = 0)."""
    torch.nn.init.zeros_(model.denoiser.conv_out.weight)
    torch.nn.init.zeros_(model.denoiser.conv_out.bias)


@pytest.mark.parametrize("preset", ["digits-vdm", "digits-mulan", "digits-mulan-v"])
def test_elbo_terms_of_batch_parts_equal_the_whole_batch(preset):
    # the network, its schedule heads and z all matter
    model = model_that_matters(preset, *(["model.latent.noise=gamma"] if preset == "digits-mulan" else [])).train()
    x = torch.randint(0, 17, (12, 1, 8, 8))
    whole = model.elbo_terms(x, generator=torch.Generator().manual_seed(3))
    parts = [model.elbo_terms(x[i * 4:(i + 1) * 4], generator=ShardedGenerator(torch.Generator().manual_seed(3), i, 3))
             for i in range(3)]
    for k in ("recon", "prior", "diffusion", "latent"):
        torch.testing.assert_close(torch.cat([getattr(p, k) for p in parts]), getattr(whole, k), rtol=1e-5, atol=1e-5)
    # what agreed depends on the draws and on the network's output
    assert not torch.allclose(model.elbo_terms(x, generator=torch.Generator().manual_seed(4)).diffusion, whole.diffusion)
    zero_output(model)
    assert not torch.allclose(model.elbo_terms(x, generator=torch.Generator().manual_seed(3)).diffusion, whole.diffusion)


@pytest.mark.parametrize("n,batch,size", [(10, 3, 2), (7, 4, 3), (1, 5, 2), (12, 2, 3)])
def test_eval_shards_cover_every_item_once_with_equal_batches_per_rank(n, batch, size):
    per_rank = [list(World(rank=r, size=size).batches(n, batch)) for r in range(size)]
    assert len({len(p) for p in per_rank}) == 1  # the same number of batches on every rank
    for batches in zip(*per_rank):
        assert len({len(idx) for idx, _ in batches}) == 1  # ... of the same size
        real = batches[0][1]
        gathered = torch.cat([idx for idx, _ in batches])[:real]
        assert gathered.tolist() == sorted(set(gathered.tolist()))
    covered = [i for batches in zip(*per_rank) for i in torch.cat([idx for idx, _ in batches])[:batches[0][1]].tolist()]
    assert covered == list(range(n))


# --- gradient accumulation ----------------------------------------------------------------------------------

@pytest.mark.parametrize("preset", ["digits-vdm", "digits-mulan"])
def test_accumulated_micro_batches_give_the_same_losses_and_weights(tmp_path, preset):
    one = train(tiny(preset), tmp_path / "one")
    four = train(tiny(preset, "train.accumulate=4"), tmp_path / "four")
    torch.testing.assert_close(torch.tensor(losses(tmp_path / "four")), torch.tensor(losses(tmp_path / "one")),
                               rtol=1e-5, atol=1e-6)
    for p, q in zip(one.model.state_dict().values(), four.model.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


def test_batch_not_divisible_by_accumulation_is_a_config_error():
    with pytest.raises(ConfigError, match=r"train.batch_size \(16\) must be divisible by train.accumulate \(3\)"):
        tiny("digits-vdm", "train.accumulate=3")


# --- mixed precision ----------------------------------------------------------------------------------------

def test_bf16_autocasts_only_the_denoiser_and_only_while_training():
    model = build_model(tiny("digits-mulan"))
    perturb(model.denoiser, 0.05)  # the output layer starts at zero (eps_hat = 0 in any precision): perturb it
    x = torch.randint(0, 17, (6, 1, 8, 8))

    def terms(train_mode: bool):
        model.train(train_mode)
        return model.elbo_terms(x, generator=torch.Generator().manual_seed(0), strict=True)

    ref_train, ref_eval = terms(True), terms(False)
    model.set_runtime(amp_dtype=torch.bfloat16)
    amp_train, amp_eval = terms(True), terms(False)
    for k in ("recon", "prior", "diffusion", "latent"):
        assert getattr(amp_train, k).dtype == torch.float32
        torch.testing.assert_close(getattr(amp_eval, k), getattr(ref_eval, k), rtol=0, atol=0)  # eval: fp32
    # The schedule's terms do not touch the denoiser: identical; the diffusion loss moves by bf16 rounding only.
    assert torch.equal(amp_train.prior, ref_train.prior) and torch.equal(amp_train.recon, ref_train.recon)
    assert not torch.equal(amp_train.diffusion, ref_train.diffusion)
    torch.testing.assert_close(amp_train.diffusion, ref_train.diffusion, rtol=0.05, atol=0.5)


def test_bf16_training_on_cpu_runs_and_stays_finite(tmp_path):
    train(tiny("digits-mulan", "train.precision=bf16", "model.denoiser.dropout=0.1"), tmp_path)
    assert all(torch.isfinite(torch.tensor(losses(tmp_path))))


@pytest.mark.parametrize("preset", ["digits-vdm", "digits-mulan"])
def test_channels_last_gives_the_same_elbo(preset):
    model = model_that_matters(preset)  # non-zero convolutions all the way to the output
    x = torch.randint(0, 17, (4, 1, 8, 8))
    ref = model.elbo_terms(x, generator=torch.Generator().manual_seed(0)).diffusion
    model.set_runtime(channels_last=True)
    assert model.denoiser.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(model.elbo_terms(x, generator=torch.Generator().manual_seed(0)).diffusion, ref,
                               rtol=1e-5, atol=1e-4)
    # the network's output matters to the term compared: zeroing it moves the term well beyond the tolerance
    zero_output(model)
    assert (model.elbo_terms(x, generator=torch.Generator().manual_seed(0)).diffusion - ref).abs().min() > 1e-2


# --- torchrun -----------------------------------------------------------------------------------------------

def mulan(*args: str, ranks: int = 0, timeout: float = 240) -> subprocess.CompletedProcess:
    """`python -m mulan ARGS`, or under torchrun with ``ranks`` CPU processes (gloo).

    ``--standalone``: torchrun's rendezvous store binds port 0 and keeps its socket, so parallel tests never
    race for a port (a port found free and released first can be taken before torchrun binds it)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "mulan"]
    if ranks:
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks),
                  "-m", "mulan"]
    return subprocess.run([*launch, *args], capture_output=True, text=True, env=env, timeout=timeout)


DDP = [*TINY, "train.steps=4", "train.device=cpu", "train.checkpoint_every=4"]


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["digits-mulan"])
def test_two_processes_train_resume_and_evaluate_like_one(tmp_path, preset):
    one = mulan("train", "--preset", preset, "--out", str(tmp_path / "one"), "--no-progress", "--quick", *DDP)
    assert one.returncode == 0, one.stderr
    # two ranks: 2 steps, then resumed under torchrun to the same 4
    two = mulan("train", "--preset", preset, "--out", str(tmp_path / "two"), "--no-progress", "--quick", *DDP,
                "train.steps=2", ranks=2)
    assert two.returncode == 0, two.stderr
    two = mulan("train", "--resume", "--out", str(tmp_path / "two"), "--no-progress", "--quick", "train.steps=4", ranks=2)
    assert two.returncode == 0, two.stderr
    torch.testing.assert_close(torch.tensor(losses(tmp_path / "two")), torch.tensor(losses(tmp_path / "one")),
                               rtol=1e-5, atol=1e-6)
    a, b = (load_checkpoint(tmp_path / r / "checkpoints" / "last.pt") for r in ("one", "two"))
    for k in a["ema"]:
        torch.testing.assert_close(b["ema"][k], a["ema"][k], rtol=1e-4, atol=1e-5)
    assert (tmp_path / "two" / "samples.png").is_file()  # rank 0 finished the run

    # Sharded evaluation: 2 ranks x batch 8 draw what 1 process with batch 16 draws (48 images: no padding).
    ckpt = str(tmp_path / "one" / "checkpoints" / "last.pt")
    runs = {}
    for name, ranks, batch in (("single", 0, 16), ("sharded", 2, 8)):
        out = tmp_path / f"eval-{name}"
        res = mulan("eval", ckpt, "--limit", "48", "--time-points", "2", "--out", str(out),
                    f"eval.batch_size={batch}", ranks=ranks)
        assert res.returncode == 0, res.stderr
        assert res.stdout.count("ELBO bound") == 1  # printed by rank 0 only
        (csv_file,) = out.glob("eval-elbo-test-first48-*.csv")
        with open(csv_file) as f:
            runs[name] = [float(r["bpd"]) for r in csv.DictReader(f)]
    assert len(runs["sharded"]) == 48
    torch.testing.assert_close(torch.tensor(runs["sharded"]), torch.tensor(runs["single"]), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_batch_not_divisible_across_ranks_is_a_one_line_error(tmp_path):
    res = mulan("train", "--preset", "digits-vdm", "--out", str(tmp_path / "r"), "--no-progress", *DDP,
                "train.batch_size=15", ranks=2)
    assert res.returncode != 0
    errors = [line for line in res.stderr.splitlines() if line.startswith("mulan: error:")]
    assert errors and "not divisible by 2 rank(s)" in errors[0]
    # no traceback through our code (torchrun adds its own failure summary, with its own frames)
    assert str(Path(mulan_pkg.__file__).parent) not in res.stderr
    assert not (tmp_path / "r").exists()  # checked before anything is written


def _check_same_worker(rank: int, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2")
    torch.set_num_threads(1)
    from mulan import distributed
    from mulan.errors import MulanError

    # a file rendezvous: no port to find free (and lose to a parallel test) before binding it
    world, _ = distributed.setup("cpu", init_method=Path(out, "store").as_uri())
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2)
    world.check_same(net, "weights")  # identical: passes
    if rank == 1:
        with torch.no_grad():
            net.weight[0, 0] += 1e-3
    try:
        world.check_same(net, "weights")
        result = "no error"
    except MulanError as e:
        result = str(e)
    distributed.teardown()
    Path(out, f"{rank}.txt").write_text(result)


@pytest.mark.slow
def test_ranks_that_diverge_are_caught(tmp_path):
    torch.multiprocessing.spawn(_check_same_worker, args=(str(tmp_path),), nprocs=2)
    for rank in (0, 1):  # every rank stops, not only the one that drifted
        assert (tmp_path / f"{rank}.txt").read_text() == "the weights differ between ranks: the ranks have diverged"


def gloo_threads() -> int:
    """Threads of this process that gloo started (its TCP loop and the process group's workers)."""
    names = []
    for task in Path("/proc/self/task").iterdir():
        try:
            names.append((task / "comm").read_text().strip())
        except OSError:  # the thread ended meanwhile
            pass
    return sum(n.startswith(("gloo", "pt_gloo")) for n in names)


def _teardown_worker(rank: int, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2")
    torch.set_num_threads(1)
    from mulan import distributed
    from mulan.train import train

    distributed.setup("cpu", init_method=Path(out, "store").as_uri())
    train(tiny("digits-vdm", "train.steps=2", "train.device=cpu"), Path(out, f"run{rank}"))  # with DDP
    alive = gloo_threads()
    distributed.teardown()
    Path(out, f"{rank}.txt").write_text(f"{alive} {gloo_threads()}")


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads through Linux's /proc")
def test_teardown_after_ddp_leaves_no_gloo_thread(tmp_path):
    """A job's process group must end in teardown, not live on into interpreter shutdown: there a gloo worker
    releasing its last collective's tensors needs the GIL and aborts the rank (SIGABRT). DDP's constructor
    imports torch.distributed.nn, whose default arguments would hold the group if it came after the group."""
    torch.multiprocessing.spawn(_teardown_worker, args=(str(tmp_path),), nprocs=2)
    for rank in (0, 1):
        alive, after = map(int, (tmp_path / f"{rank}.txt").read_text().split())
        if alive == 0:
            pytest.skip("this torch does not name gloo's threads")
        assert after == 0, f"rank {rank}: {after} of gloo's {alive} threads outlived teardown"
