"""Lossless compression by bits-back coding: exact round trips, the coded size against the bound, and every
bad input refused with one line and nothing written."""

from __future__ import annotations

import math
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run_here as cli
from conftest import tiny
from mulan.checkpoint import save_checkpoint
from mulan.coding import latents
from mulan.coding.ans import CodingError, Stack
from mulan.coding.codec import decode, encode, initial_message
from mulan.coding.schedule import Plan, in_flight
from mulan.coding.transitions import Gaussian
from mulan.data import load_splits
from mulan.likelihood.elbo import negative_elbo
from mulan.train import build_model


def random_model(preset: str, *overrides: str, scale: float = 0.05, seed: int = 0):
    """A tiny model whose every layer matters: all weights, output layers included, moved off their init."""
    cfg = tiny(preset, *overrides)
    torch.manual_seed(seed)
    model = build_model(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))
    return model, cfg


def round_trip(model, images, *, timesteps, batch, seed_images=1, budget=0.0, initial_words=4096):
    plan = Plan(chains=images.shape[0] - seed_images, timesteps=timesteps, batch=batch, budget=budget,
                need=300.0, gain=200.0, grid_bits=3, pixels=model.n)
    kw = dict(seed_images=seed_images, seed=5, initial_words=initial_words)
    enc = encode(model, images, plan, **kw)
    out = decode(model, enc.words, enc.shared_words, plan, shape=tuple(images.shape[1:]), count=images.shape[0], **kw)
    return enc, out, plan, kw


# --- exact round trips ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("preset, overrides, batch", [
    ("digits-vdm", (), 1),  # scalar learned schedule, no latent, one chain at a time
    ("digits-mulan", (), 2),  # per-pixel polynomial schedule, k-hot latent
    ("digits-mulan-no-latent", (), 3),  # per-pixel schedule, no latent
    ("digits-mulan", ("model.latent.kind=gaussian",), 7),  # Gaussian latent by bits-back; batch > images
])
def test_round_trip_is_exact_and_keeps_the_order(preset, overrides, batch):
    model, cfg = random_model(preset, *overrides)
    images = torch.randint(0, cfg.data.num_values, (6, *cfg.data.shape), dtype=torch.uint8)
    images[2] = images[3]  # neighbours one pixel apart: swapping or mixing up two chains would show
    images[3, 0, 0, 0] = (int(images[3, 0, 0, 0]) + 1) % cfg.data.num_values
    enc, out, plan, kw = round_trip(model, images, timesteps=4, batch=batch)
    assert torch.equal(out, images)
    assert int(np.diff(plan.starts()).min()) >= 0 and plan.ticks() >= plan.length

    # the network matters: the same stream decoded by a model with one weight changed is not the images
    other, _ = random_model(preset, *overrides)
    with torch.no_grad():
        other.denoiser.conv_out.weight.view(-1)[0] += 0.5
    try:
        wrong = decode(other, enc.words, enc.shared_words, plan, shape=tuple(images.shape[1:]),
                       count=images.shape[0], **kw)
    except CodingError:
        return
    assert not torch.equal(wrong, images)


def test_round_trip_when_the_initial_message_runs_dry():
    model, cfg = random_model("digits-mulan")
    images = torch.randint(0, cfg.data.num_values, (4, *cfg.data.shape), dtype=torch.uint8)
    enc, out, _, _ = round_trip(model, images, timesteps=3, batch=4, seed_images=0, budget=1e9, initial_words=2)
    assert torch.equal(out, images)


# --- the pieces ----------------------------------------------------------------------------------------------

def test_plan_starts_chains_as_the_stack_allows():
    # length T + 2 = 3; a chain starts alone, or when the needs in flight plus its own fit in
    # budget + finished * gain; need(k) = need + 2 n k
    def plan(**kw):
        return Plan(**{"chains": 3, "timesteps": 1, "batch": 2, "budget": 0.0, "need": 10.0, "gain": 10.0,
                       "grid_bits": 0, "pixels": 1, **kw})

    assert plan().starts().tolist() == [0, 3, 6]
    assert plan(gain=20.0).starts().tolist() == [0, 3, 3]
    assert plan(chains=5, budget=1e9).starts().tolist() == [0, 0, 3, 3, 6]
    # alone, a chain takes the finest grid the stack covers: need(k) = 10, 14, 18 for k = 0, 1, 2
    starts, bits = plan(batch=1, gain=15.0, grid_bits=2, pixels=2).layout()
    assert starts.tolist() == [0, 3, 6] and bits.tolist() == [0, 1, 2]
    # with others in flight, only at the finest grid
    starts, bits = plan(chains=4, batch=3, budget=40.0, grid_bits=2, pixels=2).layout()
    assert starts.tolist() == [0, 0, 3, 3] and bits.tolist() == [2, 2, 2, 2]
    plan = Plan(chains=40, timesteps=5, batch=4, budget=50.0, need=30.0, gain=12.0, grid_bits=3, pixels=2)
    starts = plan.starts()
    for tau in range(plan.ticks()):
        lo, hi = in_flight(starts, plan.length, tau)
        assert hi - lo <= 4
        assert all(starts[c] <= tau < starts[c] + plan.length for c in range(lo, hi))


def test_khot_latent_costs_exactly_log2_binomial():
    m, k, rows = 50, 15, 40  # C(50, 15) > 2^32: no integer index is ever formed
    gen = torch.Generator().manual_seed(0)
    z = torch.zeros(rows, m)
    for r in range(rows):
        z[r, torch.randperm(m, generator=gen)[:k]] = 1.0
    stack = Stack(initial_message(0, 64))
    before = stack.bits
    latents.push_khot(stack, z, k)
    spent = stack.bits - before
    assert abs(spent - rows * math.log2(math.comb(m, k))) < 1.0 + 1e-4 * spent
    assert torch.equal(latents.pop_khot(stack, rows, m, k), z)
    assert stack.bits == before


def test_escaped_push_takes_any_value_back():
    stack = Stack(initial_message(1, 64))
    g = Gaussian(torch.zeros(5, dtype=torch.float64), torch.full((5,), 2.0, dtype=torch.float64))
    j = torch.tensor([0, 15, -16, 10**7, -(10**9)])  # inside, at and far beyond the +-8 std range
    before = stack.bits
    stack.push_gaussian_escaped(j, g)
    assert torch.equal(stack.pop_gaussian_escaped(g), j)
    assert stack.bits == before


def test_draws_follow_the_distribution_even_from_dirty_bits():
    """Pops read bits that pushes under a mismatched model just wrote; the draws must still be N(mean, std)."""
    gen = torch.Generator().manual_seed(0)
    stack = Stack(initial_message(2, 4096))
    n, draws = 512, []
    for _ in range(40):
        truth = Gaussian(torch.zeros(n, dtype=torch.float64), torch.full((n,), 8.0, dtype=torch.float64))
        j = stack.pop_gaussian(truth)
        draws.append(((j - truth.mean) / truth.std).flatten())
        # push values drawn from N(1.5, 8^2) under N(0, 4^2): their codes are far from uniform bits
        wrong = Gaussian(torch.zeros(n, dtype=torch.float64), torch.full((n,), 4.0, dtype=torch.float64))
        stack.push_gaussian_escaped(torch.round(12.0 + 8.0 * torch.randn(n, generator=gen, dtype=torch.float64)).long(),
                                    wrong)
    u = torch.cat(draws)
    # a N(0, 1) sample of 20480: mean within 4 / sqrt(n), variance within 4 sqrt(2 / n) (+ 1/12 of a bin)
    assert abs(float(u.mean())) < 4 / math.sqrt(u.numel())
    assert abs(float(u.var()) - 1.0 - 1.0 / (12 * 64)) < 4 * math.sqrt(2.0 / u.numel())


# --- the coded size against the bound ------------------------------------------------------------------------

def test_coded_size_matches_the_discrete_time_bound():
    """An exact denoiser for images of i.i.d. uniform pixels, so the only model is the schedule and the
    Gaussian reverse steps. The bound comes from diffusion.py's discrete-time loss at every step, not from
    the coder. The coded length is one importance sample of the bound: its standard deviation is
    sqrt(2 L_diff) nats (each reverse step's log-ratio has variance 2 KL), ~0.7% of the total over 1024
    images. Above the bound it may lie 4 of those plus 0.5% for the grid and the 24-bit quantization (each
    measured below 0.1% in benchmarks/compression.py); read from dirty bits (no quantile rotation) it
    lay 11% above. Below, 3% more is allowed: the coder's leaky floor gives the reverse steps heavier tails
    than the Gaussian, which codes the outliers of these coarse 20-step transitions for fewer bits than the
    bound charges (1.3% here, by the codec's ledger)."""
    V, T, N = 5, 20, 1024
    model, cfg = random_model("digits-vdm", "data.shape=(1,4,4)", f"data.num_values={V}", scale=0.0)
    values = model.encode(torch.arange(V))

    def exact_eps(x_t, g, z):  # E[eps | x_t] for pixels uniform over the V values
        a, s = g.alpha2.sqrt().unsqueeze(-1), g.sigma2.sqrt().unsqueeze(-1)
        w = torch.softmax(-0.5 * ((x_t.unsqueeze(-1) - a * values) / s).square(), dim=-1)
        return (x_t - a.squeeze(-1) * (w * values).sum(-1)) / s.squeeze(-1)

    model.eps_hat = exact_eps
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, V, (N, 1, 4, 4), generator=gen, dtype=torch.uint8)
    with torch.no_grad():
        cond = model.condition(z=None, batch=N)
        x_tilde = model.encode(images)
        bound = diff = 0.0
        draws = 4
        for _ in range(draws):
            for i in range(1, T + 1):
                t = torch.full((N,), (i - 0.5) / T)
                terms = negative_elbo(x_tilde, cond.eps_fn, cond.bound, t, x=images, num_values=V, timesteps=T,
                                      generator=gen)
                terms = terms.as_dict() if hasattr(terms, "as_dict") else terms
                bound += float(sum(v.sum() for v in terms.values())) / (T * draws)
                diff += float(terms["diffusion"].sum()) / (T * draws)
    plan = Plan(chains=N, timesteps=T, batch=N, budget=1e9, need=1.0, gain=1.0, grid_bits=4, pixels=model.n)
    enc = encode(model, images, plan, seed_images=0, seed=0, initial_words=1 << 16)
    coded = enc.net_bits * math.log(2.0)  # nats
    sd = math.sqrt(2.0 * diff)
    assert bound > N * 16 * math.log(V)  # the bound bounds the true -log p = n log V of these images
    assert coded < bound + 4.0 * sd + 0.005 * bound, (coded, bound, sd)
    assert coded > bound - 4.0 * sd - 0.03 * bound, (coded, bound, sd)


# --- the command line: round trip, inputs, and every bad input ------------------------------------------------

@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A tiny digits model with non-zero output layers, and the same model with one weight changed."""
    root = tmp_path_factory.mktemp("compress")
    model, cfg = random_model("digits-mulan", scale=0.02)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    save_checkpoint(root / "a.pt", {"config": cfg, "ema": sd, "model": sd, "step": 0})
    sd2 = {k: v.clone() for k, v in sd.items()}
    sd2["denoiser.conv_out.weight"].view(-1)[0] += 1e-3
    save_checkpoint(root / "b.pt", {"config": cfg, "ema": sd2, "model": sd2, "step": 0})
    return root, cfg


def one_line_error(proc, *words: str) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("mulan: error:") and "Traceback" not in proc.stderr, proc.stderr
    for w in words:
        assert w.lower() in lines[0].lower(), (w, lines[0])
    return lines[0]


FAST = ("--timesteps", "3", "--limit", "6", "--no-progress")


@pytest.fixture(scope="module")
def compressed(checkpoints, tmp_path_factory):
    root, _ = checkpoints
    from mulan.cli import main

    out = root / "test.mlz"
    main(["compress", str(root / "a.pt"), "--split", "test", "--out", str(out), *FAST])
    return out


def test_cli_round_trip_restores_the_split_in_order(checkpoints, compressed, tmp_path, capsys):
    root, cfg = checkpoints
    expected = load_splits(cfg.data)[1].images[:6]
    proc = cli(capsys, "decompress", str(root / "a.pt"), str(compressed), "--out", str(tmp_path / "pngs"), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    from mulan.data.png import read_png_folder

    assert torch.equal(read_png_folder(tmp_path / "pngs", tuple(cfg.data.shape)), expected)
    proc = cli(capsys, "decompress", str(root / "a.pt"), str(compressed), "--out", str(tmp_path / "x.npz"), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert torch.equal(torch.from_numpy(np.load(tmp_path / "x.npz")["images"]), expected)


def test_compressing_twice_gives_the_same_bytes(checkpoints, compressed, tmp_path, capsys):
    root, _ = checkpoints
    again = tmp_path / "again.mlz"
    assert cli(capsys, "compress", str(root / "a.pt"), "--split", "test", "--out", str(again), *FAST).returncode == 0
    assert again.read_bytes() == compressed.read_bytes()


def test_cli_reads_png_folders_idx_and_npz(checkpoints, tmp_path, capsys):
    root, cfg = checkpoints
    images = torch.randint(0, cfg.data.num_values, (3, 1, 8, 8), dtype=torch.uint8)
    np.savez(tmp_path / "in.npz", images=images.numpy())
    (tmp_path / "in.idx").write_bytes(struct.pack(">IIII", 0x803, 3, 8, 8) + images.numpy().tobytes())
    for source in ("in.npz", "in.idx"):
        out = tmp_path / f"{source}.mlz"
        proc = cli(capsys, "compress", str(root / "a.pt"), str(tmp_path / source), "--out", str(out), *FAST)
        assert proc.returncode == 0, proc.stderr
        back = tmp_path / f"{source}.npz"
        assert cli(capsys, "decompress", str(root / "a.pt"), str(out), "--out", str(back), "--no-progress").returncode == 0
        assert torch.equal(torch.from_numpy(np.load(back)["images"]), images)


def _variant(path: Path, tmp_path: Path, name: str, edit) -> Path:
    data = bytearray(path.read_bytes())
    out = tmp_path / name
    out.write_bytes(bytes(edit(data)))
    return out


def test_bad_files_and_models_are_one_line_errors_with_nothing_written(checkpoints, compressed, tmp_path, capsys):
    root, _ = checkpoints
    a, b = str(root / "a.pt"), str(root / "b.pt")
    out = tmp_path / "out"

    def refuse(args, *words):
        one_line_error(cli(capsys, *args), *words)
        assert not out.exists()

    refuse(["decompress", b, str(compressed), "--out", str(out)], "another model")
    refuse(["decompress", a, str(_variant(compressed, tmp_path, "t.mlz", lambda d: d[:-5])), "--out", str(out)],
           "truncated")
    refuse(["decompress", a, str(_variant(compressed, tmp_path, "h.mlz", lambda d: d[:40])), "--out", str(out)],
           "truncated")

    def flip(d):
        d[-3] ^= 0x10
        return d

    refuse(["decompress", a, str(_variant(compressed, tmp_path, "c.mlz", flip)), "--out", str(out)], "checksum")

    def newer(d):
        d[4] = 2
        return d

    refuse(["decompress", a, str(_variant(compressed, tmp_path, "v.mlz", newer)), "--out", str(out)], "version 2")
    refuse(["decompress", a, str(_variant(compressed, tmp_path, "n.mlz", lambda d: b"PNG" + d)), "--out", str(out)],
           "not a mulan compressed file")
    refuse(["decompress", a, str(tmp_path / "missing.mlz"), "--out", str(out)], "not found")
    refuse(["compress", a, str(tmp_path / "missing.idx"), "--out", str(out), *FAST], "does not exist")
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, images=np.zeros((2, 1, 4, 4), dtype=np.uint8))
    refuse(["compress", a, str(wrong), "--out", str(out), *FAST], "shape")


def test_a_vdm_checkpoint_and_its_export_decode_the_same_file(tmp_path, capsys):
    """Scalar (0-dim) weights are hashed too, and the hash does not depend on the container."""
    from mulan.export import export

    model, cfg = random_model("digits-vdm", scale=0.02)
    sd = model.state_dict()
    assert any(v.dim() == 0 for v in sd.values())  # learned_linear's end points
    save_checkpoint(tmp_path / "vdm.pt", {"config": cfg, "ema": sd, "model": sd, "step": 0})
    export(tmp_path / "vdm.pt", tmp_path / "vdm.safetensors")
    out = tmp_path / "x.mlz"
    assert cli(capsys, "compress", str(tmp_path / "vdm.pt"), "--out", str(out), *FAST).returncode == 0
    proc = cli(capsys, "decompress", str(tmp_path / "vdm.safetensors"), str(out), "--out", str(tmp_path / "x.npz"),
               "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert torch.equal(torch.from_numpy(np.load(tmp_path / "x.npz")["images"]), load_splits(cfg.data)[1].images[:6])


def test_existing_outputs_are_never_overwritten(checkpoints, compressed, tmp_path, capsys):
    root, _ = checkpoints
    a = str(root / "a.pt")
    existing = tmp_path / "exists.mlz"
    existing.write_bytes(b"keep me")
    one_line_error(cli(capsys, "compress", a, "--out", str(existing), *FAST), "already exists")
    assert existing.read_bytes() == b"keep me"
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "x.png").write_bytes(b"keep")
    one_line_error(cli(capsys, "decompress", a, str(compressed), "--out", str(folder)), "already exists")
    assert [p.name for p in folder.iterdir()] == ["x.png"] and (folder / "x.png").read_bytes() == b"keep"
