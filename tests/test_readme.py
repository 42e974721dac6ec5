"""The README tells the truth: its Python snippets run as written, its command list is the CLI's."""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
from pathlib import Path

import pytest

from conftest import TINY
from mulan.cli import build_parser, main

README = Path(__file__).resolve().parent.parent / "README.md"


def blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def commands() -> list[list[str]]:
    """The `mulan ...` lines of the README's command list (comments dropped), split like a shell would."""
    block = next(b for b in blocks("bash") if "mulan presets" in b)
    return [shlex.split(line.split("  #")[0])[1:] for line in block.splitlines() if line.startswith("mulan ")]


@contextlib.contextmanager
def chdir(path: Path):
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def subcommands() -> dict:
    return next(a for a in build_parser()._actions if a.dest == "command").choices


@pytest.fixture(scope="module")
def in_project(tmp_path_factory):
    """A folder holding runs/a, as the README's `mulan train --preset digits-mulan --out runs/a` leaves it
    (trained briefly)."""
    root = tmp_path_factory.mktemp("readme")
    with contextlib.redirect_stdout(io.StringIO()), chdir(root):
        main(["train", "--preset", "digits-mulan", "--out", "runs/a", "--no-progress", "--quick", *TINY])
    return root


@pytest.mark.parametrize("index", range(len(blocks("python"))))
def test_every_python_snippet_runs_as_written(index, in_project, capsys):
    code = blocks("python")[index]
    with chdir(in_project):
        exec(compile(code, f"README.md python block {index + 1}", "exec"), {"__name__": "__readme__"})
    assert capsys.readouterr().out.strip()  # every snippet shows a result


def test_there_are_snippets_for_the_model_and_for_loading_a_trained_one():
    code = "\n".join(blocks("python"))
    assert "mulan.load(" in code and "elbo_terms(" in code and "negative_elbo(" in code


def test_the_command_list_covers_every_command_and_parses():
    listed = commands()
    assert {c[0] for c in listed if not c[0].startswith("-")} == set(subcommands())
    assert ["--version"] in listed
    parser = build_parser()
    for argv in listed:
        if argv != ["--version"]:  # every flag the README shows exists (argparse exits otherwise), as main() parses
            _, extra = parser.parse_known_args(argv)
            assert all("=" in e and not e.startswith("-") for e in extra), (argv, extra)


def test_the_default_run_folder_is_the_same_in_help_and_readme():
    help_text = " ".join(subcommands()["train"].format_help().split())
    assert "default runs/PRESET;" in help_text and "`make run` passes runs/PRESET-DATE-TIME" in help_text
    text = README.read_text()
    assert "into runs/PRESET, here runs/digits-vdm (`make run` uses runs/PRESET-DATE-TIME)" in text
    assert "OUT    ?= runs/$(PRESET)-$(shell date" in (README.parent / "Makefile").read_text()
