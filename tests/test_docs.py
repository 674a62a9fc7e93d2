"""The documentation runs as written: README.md and docs/*.md against today's code.

Every command line in a ```bash block is checked: ``r1mega ...`` lines resolve their config with
``--dry-run`` in-process (``r1mega plan`` resolves its own config and the command it plans;
``recipes`` and ``keys`` simply run), ``bash launchers/...``, ``python benchmarks/...`` and
``python -m tests...`` name files that exist. The README stays a front page (at most 160 lines)
that links every docs page; every relative link and its #anchor points at something that exists;
every config key a page names in backticks is a key (or a key alias) of today's config.
"""

from __future__ import annotations

import dataclasses
import re
import shlex
from pathlib import Path

import pytest

from r1mega import cli
from r1mega.config import KEY_ALIASES, Config
from r1mega.recipes import get_recipe

REPO = Path(__file__).resolve().parent.parent
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
README_MAX_LINES = 160
COMMAND_PREFIXES = ("r1mega ", "bash launchers/", "python benchmarks/", "python -m tests")
# placeholder run directory the pages use for --resume and --config (the tiny recipe's run.out_dir/run.name)
RUN_DIR = "runs/tiny"


def _rel(path: Path) -> str:
    return str(path.relative_to(REPO))


def bash_lines(path: Path) -> list[str]:
    """The lines of the ```bash blocks of `path`, continuation lines (trailing backslash) joined."""
    lines, block, pending = [], False, ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        stripped = raw.strip()
        if stripped.startswith("```"):
            block = not block and stripped == "```bash"
            continue
        if not block:
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        lines.append(pending + stripped)
        pending = ""
    return lines


def documented_commands() -> list[tuple[str, str]]:
    return [(_rel(page), line) for page in PAGES for line in bash_lines(page) if line.startswith(COMMAND_PREFIXES)]


COMMANDS = documented_commands()
R1MEGA = [(page, line) for page, line in COMMANDS if line.startswith("r1mega ")]
SCRIPTS = [(page, line) for page, line in COMMANDS if not line.startswith("r1mega ")]


def test_the_pages_show_commands():
    assert len(PAGES) >= 10 and len(R1MEGA) >= 20 and SCRIPTS


@pytest.fixture
def in_workdir(tmp_path, monkeypatch):
    """A working directory holding the run directory the pages resume (its config.json)."""
    get_recipe("tiny").save(tmp_path / RUN_DIR)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("page,line", R1MEGA, ids=[f"{p}: {line}" for p, line in R1MEGA])
def test_r1mega_command_resolves(page, line, in_workdir, capsys):
    argv = shlex.split(line, comments=True)[1:]
    if argv[:1] in (["recipes"], ["keys"]):
        assert cli.main(argv) == 0, f"{page}: {line}"
        return
    if argv[:1] == ["plan"]:
        # plan's own flags resolve its config; what follows is the command it plans, parsed as that command
        args = cli._parser().parse_args(argv)
        cli.command_config(args)
        inner = args.command_args[1:] if args.command_args[:1] == ["--"] else args.command_args
        assert inner and inner[0] in ("train", "sft", "convert"), f"{page}: {line}"
        argv = inner
    assert cli.main(argv + ["--dry-run"]) == 0, f"{page}: {line}\n{capsys.readouterr().err}"


@pytest.mark.parametrize("page,line", SCRIPTS, ids=[f"{p}: {line}" for p, line in SCRIPTS])
def test_script_exists(page, line):
    words = shlex.split(line, comments=True)
    if words[:2] == ["python", "-m"]:
        target = REPO / (words[2].replace(".", "/") + ".py")
    else:
        target = REPO / words[1]
    assert target.is_file(), f"{page}: {line}: no {target.relative_to(REPO)}"


def test_readme_is_a_front_page_that_links_every_docs_page():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= README_MAX_LINES
    for line in ("bash launchers/train.sh", "bash launchers/test.sh"):
        assert line in bash_lines(REPO / "README.md")
    linked = set(re.findall(r"\]\((docs/[^)#\s]+\.md)", readme))
    pages = {_rel(page) for page in PAGES[1:]}
    assert pages and pages <= linked, f"README links no {sorted(pages - linked)}"


def _anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = heading.strip().lower().replace("`", "")
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)
    return {_anchor(m) for m in re.findall(r"^#+\s+(.*)$", text, flags=re.M)}


LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_relative_links_point_at_existing_files_and_headings(page):
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        assert dest.exists(), f"{_rel(page)}: link {target} points at nothing"
        if anchor and dest.suffix == ".md":
            assert anchor in _anchors(dest), f"{_rel(page)}: link {target}: no such heading"


SECTIONS = [f.name for f in dataclasses.fields(Config)]
FILE_SUFFIXES = {"json", "jsonl", "py", "png", "txt", "log", "md", "sh"}


def _known_keys() -> set[str]:
    defaults = Config()
    keys = {f"{s}.{f.name}" for s in SECTIONS for f in dataclasses.fields(getattr(defaults, s))}
    return keys | set(KEY_ALIASES)


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_config_keys_named_in_backticks_exist(page):
    # `policy.` is also the Policy object in code spans (policy.train_step), so its keys are left to r1mega keys
    sections = "|".join(s for s in SECTIONS if s != "policy")
    key = re.compile(rf"(?<![\w.])((?:{sections})\.[a-z_0-9]+)(?![\w(])")
    known = _known_keys()
    text = page.read_text(encoding="utf-8")
    named = {k for span in re.findall(r"`([^`\n]+)`", text) for k in key.findall(span)}
    unknown = sorted(k for k in named if k not in known and k.rsplit(".", 1)[1] not in FILE_SUFFIXES)
    assert not unknown, f"{_rel(page)} names keys that do not exist: {unknown}"
