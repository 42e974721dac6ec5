"""The README and docs/ tell the truth: their Python snippets run as written, their command lines are the CLI's,
their links lead somewhere, and the README stays a front door."""

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

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\S*)\n(.*?)^```", flags=re.S | re.M)


def name(page: Path) -> str:
    return page.relative_to(ROOT).as_posix()


def blocks(language: str, pages: list[Path] = PAGES) -> list[tuple[str, str]]:
    """(page, code) of every fenced block in that language, page by page in order."""
    return [(name(p), code) for p in pages for lang, code in FENCE.findall(p.read_text()) if lang == language]


def command_lines(code: str) -> list[list[str]]:
    """The `mulan ...` (and `... -m mulan ...`) lines of a bash block, comments dropped, split like a shell would."""
    found = []
    for line in code.splitlines():
        line = line.split("  #")[0].strip().rstrip("\\").strip()
        if line.startswith("mulan "):
            found.append(shlex.split(line)[1:])
        elif "-m mulan " in f"{line} ":
            found.append(shlex.split(line.split("-m mulan", 1)[1]))
    return found


def command_list(page: Path) -> list[list[str]]:
    """The page's command list: its bash block that runs `mulan presets`."""
    code = next(c for _, c in blocks("bash", [page]) if "mulan presets" in c)
    return command_lines(code)


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
    """A folder holding runs/a, as `mulan train --preset digits-mulan --out runs/a` leaves it (trained briefly)."""
    root = tmp_path_factory.mktemp("readme")
    with contextlib.redirect_stdout(io.StringIO()), chdir(root):
        main(["train", "--preset", "digits-mulan", "--out", "runs/a", "--no-progress", "--quick", *TINY])
    return root


SNIPPETS = blocks("python")


@pytest.mark.parametrize("page, code", SNIPPETS, ids=[f"{p}-{i}" for i, (p, _) in enumerate(SNIPPETS)])
def test_every_python_snippet_runs_as_written(page, code, in_project, capsys):
    with chdir(in_project):
        exec(compile(code, f"{page} python block", "exec"), {"__name__": "__readme__"})
    assert capsys.readouterr().out.strip()  # every snippet shows a result


def test_there_are_snippets_for_the_model_for_loading_a_trained_one_and_for_your_own_network():
    code = "\n".join(c for _, c in SNIPPETS)
    assert "mulan.load(" in code and "elbo_terms(" in code and "negative_elbo(" in code
    assert "ode_log_likelihood(" in code and "dequantized_nll(" in code


def test_the_command_reference_covers_every_command():
    listed = command_list(ROOT / "docs" / "cli.md")
    assert {c[0] for c in listed if not c[0].startswith("-")} == set(subcommands())
    assert ["--version"] in listed


def test_the_readme_shows_the_commands_a_user_types_most():
    shown = {c[0] for c in command_list(README)}
    assert {"train", "eval", "compare", "sample", "compress", "decompress"} <= shown


@pytest.mark.parametrize("page", PAGES, ids=name)
def test_every_command_line_shown_parses(page):
    parser = build_parser()
    for _, code in blocks("bash", [page]):
        for argv in command_lines(code):
            if argv != ["--version"]:  # every flag shown exists (argparse exits otherwise), as main() parses
                _, extra = parser.parse_known_args(argv)
                assert all("=" in e and not e.startswith("-") for e in extra), (name(page), argv, extra)


def test_the_default_run_folder_is_the_same_in_help_and_docs():
    help_text = " ".join(subcommands()["train"].format_help().split())
    assert "default runs/PRESET;" in help_text and "`make run` passes runs/PRESET-DATE-TIME" in help_text
    text = (ROOT / "docs" / "cli.md").read_text()
    assert "into runs/PRESET, here runs/digits-vdm (`make run` uses runs/PRESET-DATE-TIME)" in text
    assert "OUT    ?= runs/$(PRESET)-$(shell date" in (ROOT / "Makefile").read_text()


def test_the_readme_starts_with_the_two_commands_ci_runs():
    first = blocks("bash", [README])[0][1]
    assert [line.split("#")[0].strip() for line in first.splitlines()] == ["make run", "make test"]
    assert "make test" in (ROOT / ".ci" / "run").read_text().splitlines()


def test_the_readme_is_a_front_door():
    assert len(README.read_text().splitlines()) <= 150


# --- links -------------------------------------------------------------------------------------------------------

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def prose(text: str) -> str:
    """The text outside fenced blocks and inline code, where a link is a link."""
    return re.sub(r"`[^`\n]*`", "", FENCE.sub("", text))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped (hyphens kept), spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for heading in re.findall(r"^#{1,6} (.+)$", FENCE.sub("", page.read_text()), flags=re.M):
        s = slug(heading)
        out.add(f"{s}-{seen[s]}" if s in seen else s)  # GitHub numbers repeated headings
        seen[s] = seen.get(s, 0) + 1
    return out


def test_the_anchor_rule_is_githubs():
    assert slug("Fashion-MNIST: being re-measured (issue 18)") == "fashion-mnist-being-re-measured-issue-18"
    assert slug("3. From Python, with your own network") == "3-from-python-with-your-own-network"
    assert slug("Throughput — 2026-11-29, CPU (2 cores), torch 2.13.0+cpu") == \
        "throughput--2026-11-29-cpu-2-cores-torch-2130cpu"


def broken_links(page: Path) -> list[str]:
    broken = []
    for target in LINK.findall(prose(page.read_text())):
        if re.match(r"[a-z]+:", target):  # https:, mailto: ...
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading #{anchor} in {dest.name}")
    return broken


@pytest.mark.parametrize("page", [*PAGES, ROOT / "benchmarks" / "RESULTS.md"], ids=name)
def test_every_relative_link_leads_to_a_file_and_heading_that_exist(page):
    assert broken_links(page) == []


def test_the_link_check_finds_a_missing_file_and_a_missing_heading(tmp_path):
    (tmp_path / "there.md").write_text("# A heading\n\ntext\n")
    page = tmp_path / "page.md"
    page.write_text("[ok](there.md#a-heading) [gone](gone.md) [no](there.md#nope) `[code](gone.md)`\n")
    assert broken_links(page) == ["gone.md: no such file", "there.md#nope: no heading #nope in there.md"]


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(README.parent / t.partition("#")[0]).resolve() for t in LINK.findall(prose(README.read_text()))}
    assert set(PAGES[1:]) <= linked


def test_every_docs_page_the_code_and_help_name_exists():
    texts = [p.read_text() for p in (ROOT / "mulan").rglob("*.py")]
    texts += [parser.format_help() for parser in subcommands().values()]
    named = {m for text in texts for m in re.findall(r"docs/[\w.-]+\.md", text)}
    assert "docs/distributed.md" in named  # `mulan train --help` sends readers about torchrun there
    assert [n for n in sorted(named) if not (ROOT / n).exists()] == []


def test_the_headline_quotes_the_test_split_result_the_benchmark_wrote():
    """The README's and results page's digits claim is the benchmark's own test-split row (mean over seeds,
    t-interval over seeds), not a number typed in elsewhere."""
    written = (ROOT / "benchmarks/results/mulan_vs_vdm/digits-test/README.md").read_text()
    row = next(line for line in written.splitlines() if line.startswith("| ends-map |"))
    mean, ci = re.search(r"\*\*([-+]\d\.\d{4}) ± (\d\.\d{4})\*\*", row).groups()
    quoted = f"{mean.replace('-', '−')} ± {ci}"
    for page in (README, ROOT / "docs" / "results.md"):
        assert quoted in page.read_text(), (page.name, quoted)
