"""What the command line writes and says: checked flags, results never replaced, files named by what they hold,
run folders as checkpoints, progress bars on every long step, samples as arrays."""

from __future__ import annotations

import contextlib
import io
import json
import pickle
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import TINY
from test_cli import assert_clean_error

import mulan
from mulan.cli import build_parser, main


def cli(*args: str):
    """``mulan ARGS`` in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(list(args))
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
    return code, out.getvalue(), err.getvalue()


class Proc:  # the shape assert_clean_error expects
    def __init__(self, result):
        self.returncode, self.stdout, self.stderr = result


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("outputs") / "run"
    code, stdout, stderr = cli("train", "--preset", "digits-mulan", "--out", str(out), "--no-progress", *TINY)
    assert code == 0, stderr
    return out


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --- every count flag is checked like its config field ----------------------------------------------------

@pytest.mark.parametrize("command,flag,value,words", [
    ("eval", "--time-points", "-1", ["eval.time_points", ">= 1"]),
    ("eval", "--time-points", "0", ["eval.time_points"]),
    ("eval", "--limit", "0", [">= 1"]),
    ("eval", "--limit", "-3", [">= 1"]),
    ("eval", "--timesteps", "-2", ["model.timesteps"]),
    ("sample", "--steps", "-1", ["eval.sample_steps"]),
    ("sample", "--steps", "0", ["eval.sample_steps"]),
    ("sample", "--num", "-1", ["eval.num_samples"]),
    ("sample", "--num", "0", ["eval.num_samples"]),
    ("plot-schedule", "--steps", "0", ["eval.sample_steps"]),
])
def test_zero_or_negative_counts_are_one_line_errors(run_dir, tmp_path, command, flag, value, words):
    out = tmp_path / "out"
    target = str(out / "s.png") if command == "sample" else str(out)
    proc = Proc(cli(command, str(run_dir / "checkpoints" / "last.pt"), flag, value, "--out", target))
    assert_clean_error(proc, flag, *words)
    assert not out.exists()  # nothing written


def test_flags_that_the_chosen_estimator_or_sampler_ignores_are_refused(run_dir):
    ckpt = str(run_dir / "checkpoints" / "last.pt")
    assert_clean_error(Proc(cli("eval", ckpt, "--estimator", "ode", "--time-points", "4")), "--time-points")
    assert_clean_error(Proc(cli("sample", ckpt, "--sampler", "ode", "--steps", "4")), "--steps")


@pytest.mark.parametrize("flags,words", [
    (["--sampler", "euler"], ["unknown sampler", "'euler'", "ddim", "dpm2m"]),
    (["--sampler", "ancestral", "--eta", "0.5"], ["--eta", "ddim and dpm2m", "not ancestral"]),
    (["--sampler", "ode", "--eta", "1"], ["--eta", "not ode"]),
    (["--sampler", "dpm2m", "--eta", "1.5"], ["--eta 1.5", "[0, 1]"]),
    (["--sampler", "ddim", "--grid", "cosine"], ["unknown --grid", "'cosine'"]),
])
def test_bad_sampler_settings_are_one_line_errors(run_dir, tmp_path, flags, words):
    out = tmp_path / "s.png"
    assert_clean_error(Proc(cli("sample", str(run_dir / "checkpoints" / "last.pt"), *flags, "--out", str(out))), *words)
    assert not out.exists()


# --- nothing overwrites a result --------------------------------------------------------------------------

def test_subset_evaluation_leaves_the_whole_split_result_alone(run_dir):
    before = files(run_dir)
    whole = [n for n in before if n.startswith("eval-elbo-test-all-")]
    assert sorted(whole) == ["eval-elbo-test-all-S2-seed0-ema-step3.csv", "eval-elbo-test-all-S2-seed0-ema-step3.json"]
    code, stdout, stderr = cli("eval", str(run_dir / "checkpoints" / "last.pt"), "--limit", "8", "--no-progress")
    assert code == 0, stderr
    after = files(run_dir)
    for name in whole:
        assert after[name] == before[name]
    stem = "eval-elbo-test-first8-S2-seed0-ema-step3"
    summary = json.loads(after[f"{stem}.json"])
    assert summary["images"] == 8 and summary["subset"] and len(after[f"{stem}.csv"].decode().splitlines()) == 9
    # the same evaluation again is refused and changes nothing; --overwrite replaces it
    again = Proc(cli("eval", str(run_dir / "checkpoints" / "last.pt"), "--limit", "8"))
    assert_clean_error(again, "already exists", "--overwrite")
    assert files(run_dir) == after
    code, _, stderr = cli("eval", str(run_dir / "checkpoints" / "last.pt"), "--limit", "8", "--overwrite")
    assert code == 0, stderr


def test_eval_names_say_what_they_hold_and_the_json_says_which_weights(run_dir, tmp_path):
    ckpt = str(run_dir / "checkpoints" / "last.pt")
    for extra, stem in ((["--time-points", "3", "--seed", "5"], "eval-elbo-test-first6-S3-seed5-ema-step3"),
                        (["--raw"], "eval-elbo-test-first6-S2-seed0-raw-step3"),
                        (["--timesteps", "10"], "eval-elbo-test-first6-S2-T10-seed0-ema-step3"),
                        (["--split", "train"], "eval-elbo-train-first6-S2-seed0-ema-step3")):
        code, stdout, stderr = cli("eval", ckpt, "--limit", "6", "--out", str(tmp_path), *extra)
        assert code == 0, stderr
        summary = json.loads((tmp_path / f"{stem}.json").read_text())
        rows = (tmp_path / f"{stem}.csv").read_text().splitlines()
        assert len(rows) == 1 + summary["images"] == 7
        weights = "raw" if "--raw" in extra else "ema"
        assert summary["weights"] == weights and summary["step"] == 3 and summary["checkpoint"] == ckpt
        assert summary["settings"]["seed"] == int(extra[-1]) if "--seed" in extra else summary["settings"]["seed"] == 0
        assert len(summary["dataset"]["sha256"]) == 64
        assert f"step 3, {'raw' if weights == 'raw' else 'EMA'} weights" in stdout
    assert len(list(tmp_path.glob("*.json"))) == 4  # four settings, four results, none replaced


def test_export_and_sample_never_replace_a_file(run_dir, tmp_path):
    ckpt = str(run_dir / "checkpoints" / "last.pt")
    target = tmp_path / "model.safetensors"
    assert cli("export", ckpt, "--out", str(target))[0] == 0
    before = target.read_bytes()
    assert_clean_error(Proc(cli("export", ckpt, "--out", str(target), "--raw")), "already exists")
    assert target.read_bytes() == before
    assert cli("export", ckpt, "--out", str(target), "--raw", "--overwrite")[0] == 0
    assert target.read_bytes() != before
    png = tmp_path / "s.png"
    assert cli("sample", ckpt, "--num", "2", "--steps", "2", "--out", str(png))[0] == 0
    before = png.read_bytes()
    assert_clean_error(Proc(cli("sample", ckpt, "--num", "2", "--steps", "2", "--seed", "1", "--out", str(png))),
                       "already exists")
    assert png.read_bytes() == before


# --- checkpoints: run folders, and files that are not checkpoints -------------------------------------------

def test_a_run_folder_stands_for_its_last_checkpoint(run_dir, tmp_path):
    code, stdout, stderr = cli("sample", str(run_dir), "--num", "2", "--steps", "2", "--out", str(tmp_path / "s.npz"))
    assert code == 0, stderr
    assert str(run_dir / "checkpoints" / "last.pt") in stdout
    assert_clean_error(Proc(cli("eval", str(tmp_path))), "folder", "checkpoints/last.pt")


def test_files_that_are_not_checkpoints_are_named_for_what_they_are(run_dir, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    for path, words in ((run_dir / "config.json", ["config.json", "JSON", "not a checkpoint"]),
                        (run_dir / "samples.png", ["samples.png", "PNG image", "not a checkpoint"]),
                        (text, ["text file"])):
        proc = Proc(cli("eval", str(path)))
        assert_clean_error(proc, *words)
        assert "more than weights" not in proc.stderr and "Weights only load failed" not in proc.stderr


def test_a_pickle_that_would_run_code_is_refused_without_library_text(tmp_path):
    canary = tmp_path / "canary"

    class Evil:
        def __reduce__(self):
            import os
            return (os.system, (f"touch {canary}",))

    bad = tmp_path / "evil.pkl"  # a plain pickle (protocol 4): torch's loader warns about it before refusing
    bad.write_bytes(pickle.dumps({"format": "mulan-checkpoint", "payload": Evil()}, protocol=4))
    zipped = tmp_path / "evil.pt"
    torch.save({"format": "mulan-checkpoint", "payload": Evil()}, zipped)
    for path, words in ((bad, ["refusing", "evil.pkl"]), (zipped, ["refusing", "system", "run code"])):
        with warnings.catch_warnings(record=True) as caught:  # a warning would print before our line
            warnings.simplefilter("always")
            proc = Proc(cli("eval", str(path)))
        assert_clean_error(proc, *words)
        assert [str(w.message) for w in caught] == []
    assert not canary.exists()


# --- progress --------------------------------------------------------------------------------------------

@pytest.fixture
def terminal(monkeypatch):
    """stderr counts as a terminal (bars are drawn only there)."""
    import mulan.progress

    monkeypatch.setattr(mulan.progress, "stderr_is_terminal", lambda: True)


def test_eval_and_sample_draw_progress_bars(run_dir, tmp_path, terminal):
    ckpt = str(run_dir / "checkpoints" / "last.pt")
    code, _, err = cli("eval", ckpt, "--limit", "5", "--out", str(tmp_path))
    assert code == 0 and re.search(r"ELBO, test split: 100%.*5/5 images", err), err
    code, _, err = cli("eval", ckpt, "--estimator", "ode", "--limit", "2", "--out", str(tmp_path),
                       "eval.ode_rtol=1e-2", "eval.ode_atol=1e-2")
    assert code == 0 and re.search(r"ODE, test split: 100%.*2/2 images", err), err
    code, _, err = cli("sample", ckpt, "--num", "2", "--steps", "3", "--out", str(tmp_path / "s.png"))
    assert code == 0 and re.search(r"sampling 2 images \(ancestral-T3\): 100%.*3/3 steps", err), err
    code, _, err = cli("sample", ckpt, "--num", "2", "--steps", "3", "--out", str(tmp_path / "t.png"), "--no-progress")
    assert code == 0 and err == ""


def test_training_draws_bars_for_its_final_evaluation_and_sampling(tmp_path, terminal):
    code, _, err = cli("train", "--preset", "digits-vdm", "--out", str(tmp_path / "r"), "--quick", *TINY)
    assert code == 0, err
    for what in ("final ELBO, test split: 100%", "sampling 4 images: 100%", "figures: samples per z: 100%"):
        assert what in err, err


def test_no_bars_when_stderr_is_not_a_terminal(tmp_path):
    code, _, err = cli("train", "--preset", "digits-vdm", "--out", str(tmp_path / "r"), "--quick", *TINY)
    assert code == 0 and err == "", err


# --- samples as arrays -----------------------------------------------------------------------------------

def _tiles(png: Path, separator=(70, 130, 180)) -> list[np.ndarray]:
    """The tiles of a PNG grid, found by its separator lines, each shrunk back to one value per image pixel."""
    from PIL import Image

    rgb = np.asarray(Image.open(png).convert("RGB")).astype(int)
    is_sep = (rgb == np.array(separator)).all(-1)
    rows, cols = is_sep.all(1), is_sep.all(0)

    def runs(mask):  # [start, stop) of each stretch that is not separator
        edges = np.flatnonzero(np.diff(np.r_[1, mask.astype(int), 1]))
        return list(zip(edges[::2], edges[1::2]))

    tiles = []
    for top, bottom in runs(rows):
        for left, right in runs(cols):
            tiles.append(rgb[top:bottom, left:right])
    return tiles


def test_npz_samples_hold_the_pngs_pixels_and_their_z(run_dir, tmp_path):
    ckpt = str(run_dir / "checkpoints" / "last.pt")
    for name in ("s.png", "s.npz"):
        code, _, err = cli("sample", ckpt, "--num", "5", "--steps", "3", "--seed", "7", "--out", str(tmp_path / name))
        assert code == 0, err
    data = np.load(tmp_path / "s.npz")
    images, z = data["images"], data["z"]
    assert images.shape == (5, 1, 8, 8) and images.dtype == np.uint8 and int(data["num_values"]) == 17
    assert images.max() <= 16
    assert z.shape == (5, 8) and set(np.unique(z)) <= {0.0, 1.0} and (z.sum(1) == 2).all()  # k-hot, k = 2
    tiles = _tiles(tmp_path / "s.png")[:5]  # a 3 x 2 grid: the sixth tile is empty
    for img, tile in zip(images, tiles):
        h, w = tile.shape[:2]
        grey = tile[h // 16::h // 8, w // 16::w // 8, 0]  # the centre of each enlarged pixel
        assert grey.shape == (8, 8)
        np.testing.assert_array_equal(grey, np.round(img[0] * 255.0 / 16))


def test_an_unknown_suffix_is_refused_before_sampling(run_dir, tmp_path):
    proc = Proc(cli("sample", str(run_dir / "checkpoints" / "last.pt"), "--out", str(tmp_path / "x.jpg")))
    assert_clean_error(proc, ".jpg", ".png", ".npz")
    assert not (tmp_path / "x.jpg").exists()


# --- the rest of a user's day ----------------------------------------------------------------------------

def test_version():
    code, out, _ = cli("--version")
    assert code == 0 and out.strip() == f"mulan {mulan.__version__}"


def test_a_mistyped_key_gets_a_suggestion(tmp_path):
    proc = Proc(cli("train", "--out", str(tmp_path / "r"), "train.step=5"))
    assert_clean_error(proc, "unknown config key 'train.step'", "did you mean 'train.steps'")


def test_help_and_errors_name_the_same_overrides(run_dir):
    from mulan.loading import LOAD_OVERRIDES_TEXT

    parser = build_parser()
    subs = next(a for a in parser._actions if a.dest == "command").choices
    ckpt = str(run_dir / "checkpoints" / "last.pt")
    for command in ("eval", "sample", "plot-schedule"):
        help_text = " ".join(subs[command].format_help().split())
        assert LOAD_OVERRIDES_TEXT in help_text, command
        proc = Proc(cli(command, ckpt, "model.prediction=v"))
        assert_clean_error(proc, LOAD_OVERRIDES_TEXT, "model.prediction")


def test_presets_come_with_a_line_each_saying_what_they_are():
    from mulan.presets import get_preset, preset_names

    code, out, _ = cli("presets")
    lines = out.strip().splitlines()
    assert code == 0 and [ln.split()[0] for ln in lines] == preset_names()
    for line in lines:
        cfg = get_preset(line.split()[0])
        assert f"V={cfg.data.num_values}" in line and f"{cfg.model.prediction}-prediction" in line
        assert ("no latent" in line) == (cfg.model.latent.kind == "none")
        assert ("per-pixel" in line) == cfg.model.schedule.kind.startswith(("polynomial", "pixel_"))


def _bench_module():
    """benchmarks/mulan_vs_vdm.py, imported as a module."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "mulan_vs_vdm.py"
    spec = importlib.util.spec_from_file_location("mulan_vs_vdm_bench", path)
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench  # its dataclasses look their module up
    spec.loader.exec_module(bench)
    return bench


def test_benchmark_training_time_counts_each_step_once_and_stops_at_the_tabulated_step(tmp_path):
    """Training time from a log: (steps since the previous line) x batch / images_per_s per line; a resumed run's
    repeated step counts once, and a run trained past the tabulated step is counted only up to it."""
    rows = [(50, 10.0), (100, 20.0), (100, 20.0), (150, 5.0)]
    (tmp_path / "metrics.jsonl").write_text("".join(
        json.dumps({"kind": "train", "step": s, "images_per_s": ips}) + "\n" for s, ips in rows)
        + json.dumps({"kind": "eval", "step": 150}) + "\n")
    bench = _bench_module()
    # batch 10: 50 steps at 10 img/s = 50 s, 50 at 20 = 25 s, 50 at 5 = 100 s
    assert bench.train_seconds(tmp_path, 10) == pytest.approx(175.0)
    assert bench.train_seconds(tmp_path, 10, up_to=100) == pytest.approx(75.0)
    assert bench.train_seconds(tmp_path, 10, up_to=149) == pytest.approx(75.0)


@pytest.mark.parametrize("preset, results, name", [
    ("digits-mulan-ends-map", "digits-test", "ends-map"),
    ("fashion-mulan-ends-map-latent", "fashion-test", "ends-map-latent"),
])
def test_recommended_presets_are_the_configurations_the_benchmark_measured(preset, results, name):
    """The README recommends a preset because benchmarks/mulan_vs_vdm.py measured it: the configuration its
    checkpoints recorded at training time (summary.json 'resolved') must be exactly the preset today, but for
    the train settings the benchmark sets on every run."""
    from pathlib import Path

    from mulan.config import Config, from_dict
    from mulan.presets import get_preset

    root = Path(__file__).resolve().parent.parent
    bench = _bench_module()
    summary = json.loads((root / "benchmarks" / "results" / "mulan_vs_vdm" / results / "summary.json").read_text())
    measured, named = from_dict(Config, summary["resolved"][name]), get_preset(preset)
    for key in bench.BENCH_TRAIN_KEYS:
        setattr(measured.train, key, getattr(named.train, key))
    measured.preset = named.preset
    assert measured == named


def test_resume_counts_the_steps_of_this_time_and_keeps_its_preset(tmp_path):
    out = tmp_path / "r"
    code, _, err = cli("train", "--preset", "digits-vdm", "--out", str(out), "--quick", *TINY, "train.steps=2")
    assert code == 0, err
    before = files(out)
    proc = Proc(cli("train", "--resume", "--preset", "digits-mulan", "--out", str(out), "--quick", "train.steps=3"))
    assert_clean_error(proc, "--preset digits-mulan", "digits-vdm")
    assert files(out) == before
    code, stdout, err = cli("train", "--resume", "--preset", "digits-vdm", "--out", str(out), "--quick",
                            "train.steps=3")
    assert code == 0, err
    assert "trained 1 step this time (step 2 -> 3)" in stdout
    assert "eval-elbo-test-all-S4-seed0-ema-step2.json" in files(out)  # the first result is still there
