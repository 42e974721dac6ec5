"""The command line end to end on tiny settings, and its answer to every bad input: one line, exit code 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import TINY, run_here

CLI = [sys.executable, "-m", "mulan"]


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # tests run two at a time on two cores
    return subprocess.run([*CLI, *args], capture_output=True, text=True, cwd=cwd, timeout=300, env=env)


def assert_clean_error(proc: subprocess.CompletedProcess, *words: str) -> None:
    """Exit code 2, a single 'mulan: error:' line naming the problem, and no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert "Traceback" not in proc.stderr
    assert len(lines) == 1 and lines[0].startswith("mulan: error:"), proc.stderr
    for w in words:
        assert w.lower() in lines[0].lower(), (w, lines[0])


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "run"
    proc = run("train", "--preset", "digits-mulan", "--out", str(out), "--no-progress", *TINY)
    assert proc.returncode == 0, proc.stderr
    assert "ELBO bound:" in proc.stdout and "bits/dim" in proc.stdout
    return out


def test_train_writes_everything_a_run_promises(trained_run):
    stem = "eval-elbo-test-all-S2-seed0-ema-step3"  # README: estimator, split, count, settings, seed, weights, step
    for name in ("config.json", "metrics.jsonl", "samples.png", "results.json", f"{stem}.csv", f"{stem}.json",
                 "checkpoints/last.pt"):
        assert (trained_run / name).is_file(), name
    summary = json.loads((trained_run / f"{stem}.json").read_text())
    assert summary["weights"] == "ema" and summary["step"] == 3 and summary["checkpoint"].endswith("last.pt")
    rows = (trained_run / f"{stem}.csv").read_text().strip().splitlines()[1:]
    assert summary["images"] == len(rows) == 64 and summary["latent_kl"] == "strict"
    mean = sum(float(r.split(",")[1]) for r in rows) / len(rows)
    assert abs(mean - summary["bpd"]) < 1e-4
    records = [json.loads(ln) for ln in (trained_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3]


def test_eval_and_sample_from_the_checkpoint_alone(trained_run, tmp_path):
    ckpt = trained_run / "checkpoints" / "last.pt"
    proc = run("eval", str(ckpt), "--limit", "10", "--time-points", "2", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert "10 images (subset of test split)" in proc.stdout
    proc = run("sample", str(ckpt), "--num", "4", "--steps", "3", "--out", str(tmp_path / "s.png"))
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_on_the_validation_split(trained_run, tmp_path):
    """--split val evaluates the images carved from the training split (data.val_size), names them in the files
    and the report; a model trained without a validation split refuses --split val with one line."""
    ckpt = trained_run / "checkpoints" / "last.pt"
    proc = run("eval", str(ckpt), "--split", "val", "--limit", "10", "--time-points", "2", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert "10 images (subset of val split)" in proc.stdout
    (summary,) = tmp_path.glob("eval-elbo-val-first10-S2-seed0-ema-step3.json")
    assert json.loads(summary.read_text())["dataset"]["split"] == "val"
    proc = run("eval", str(ckpt), "--split", "val", "--limit", "10", "--out", str(tmp_path / "b"), "data.val_size=0")
    assert_clean_error(proc, "no validation split")


def test_dry_run_prints_resolved_config():
    proc = run("train", "--preset", "digits-vdm", "--dry-run", "train.steps=7", "model.prediction=v")
    assert proc.returncode == 0, proc.stderr
    cfg = json.loads(proc.stdout)
    assert cfg["train"]["steps"] == 7 and cfg["model"]["prediction"] == "v"
    assert cfg["model"]["schedule"]["kind"] == "learned_linear"


def test_existing_run_is_never_overwritten(trained_run, capsys):
    before = (trained_run / "checkpoints" / "last.pt").read_bytes()
    proc = run_here(capsys, "train", "--preset", "digits-vdm", "--out", str(trained_run), *TINY)
    assert_clean_error(proc, "already holds a run")
    assert (trained_run / "checkpoints" / "last.pt").read_bytes() == before


@pytest.mark.parametrize("args,words", [
    (["--preset", "nope"], ["unknown preset", "nope"]),
    (["train.nope=1"], ["unknown config key", "train.nope"]),
    (["train.steps=many"], ["train.steps", "integer"]),
    (["model.schedule.kind=cubic"], ["model.schedule.kind", "cubic"]),
    (["model.latent.k=20"], ["model.latent.k", "1 <= k < m", "k=20", "m=8"]),
    (["model.schedule.gamma_min=6"], ["model.schedule.gamma_min (6.0)", "below gamma_max (5.0)"]),
    (["--preset", "digits-fixed", "model.schedule.learn_ends=pixel"],  # a setting the model would ignore
     ["model.schedule.learn_ends=pixel", "would be ignored", "scalar schedule"]),
    (["justtext"], ["'justtext'", "key=value"]),
    (["data.num_values=8"], ["value 16", "data.num_values=8", "0..7"]),  # digits has values up to 16
    (["data.shape=1,9,9"], ["shape (1, 8, 8)", "data.shape=(1, 9, 9)"]),
    (["data.name=idx", "data.path=/nonexistent/file.idx"], ["/nonexistent/file.idx"]),
])
def test_bad_settings_are_one_line_errors(args, words, tmp_path, capsys):
    out = tmp_path / "run"
    proc = run_here(capsys, "train", "--out", str(out), "--no-progress", *TINY, *args)
    assert_clean_error(proc, *words)
    assert not (out / "checkpoints").exists()


def test_corrupt_and_foreign_checkpoints_are_refused(trained_run, tmp_path, capsys):
    good = (trained_run / "checkpoints" / "last.pt").read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good[: len(good) // 2])
    assert_clean_error(run_here(capsys, "eval", str(truncated)), "truncated.pt")
    assert_clean_error(run_here(capsys, "sample", str(tmp_path / "missing.pt")), "not found")
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    assert_clean_error(run_here(capsys, "eval", str(foreign)), "not a mulan checkpoint")
    # a checkpoint whose weights belong to another model
    state = torch.load(trained_run / "checkpoints" / "last.pt", weights_only=True)
    state["config"]["model"]["denoiser"]["channels"] = 32
    state["config"]["model"]["denoiser"]["groups"] = 8
    other = tmp_path / "other.pt"
    torch.save(state, other)
    assert_clean_error(run_here(capsys, "eval", str(other)), "do not fit")


def test_checkpoint_that_would_run_code_is_refused(tmp_path):
    canary = tmp_path / "canary"

    class Evil:
        def __reduce__(self):
            import os
            return (os.system, (f"touch {canary}",))

    bad = tmp_path / "evil.pt"
    torch.save({"format": "mulan-checkpoint", "payload": Evil()}, bad)
    assert_clean_error(run("eval", str(bad)), "refusing")
    assert not canary.exists()


def test_unwritable_output_directory(tmp_path, capsys):
    # A regular file where a folder should be: unwritable even for root, who ignores permission bits.
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert_clean_error(run_here(capsys, "train", "--out", str(blocker / "run"), *TINY), "not writable")
    assert blocker.read_text() == "not a folder"


def test_tensorboard_gets_scalars_schedule_figures_and_samples(tmp_path, capsys):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    proc = run_here(capsys, "train", "--preset", "digits-mulan", "--out", str(out), "--no-progress", "--quick", *TINY,
                    "train.eval_every=2", "train.eval_images=8")
    assert proc.returncode == 0, proc.stderr
    tags = {"images": set(), "scalars": set()}
    for f in (out / "tensorboard").iterdir():
        acc = EventAccumulator(str(f))
        acc.Reload()
        for k in tags:
            tags[k] |= set(acc.Tags()[k])
    assert {"train/loss_bpd", "eval/val_bpd"} <= tags["scalars"]  # digits presets evaluate on a validation split
    assert {"schedule/gamma_heatmaps", "samples"} <= tags["images"]
