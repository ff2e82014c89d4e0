"""The documentation tells the truth about the repository and the command line: every relative
link and every repository path named in README.md, DEVELOPERS.md and docs/ exists, and every
`domix …` command shown there names real subcommands and real options (with a listed value
where the option has choices)."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from domix.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", ROOT / "DEVELOPERS.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
CODE = re.compile(r"`([^`\n]+)`")
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.M | re.S)
# a path into the repository: one of its top-level folders, then a file or folder name
REPO_PATH = re.compile(r"^(src|docs|results|tests|\.ci)/[\w./-]*[\w/]$")
PLACEHOLDER = re.compile(r"[A-Z]{2,}|[<>{}\[\]|…]|\.\.\.")


def _ids(pages):
    return [str(p.relative_to(ROOT)) for p in pages]


def test_the_pages_are_found():
    assert len(PAGES) >= 6 and all(p.is_file() for p in PAGES)


@pytest.mark.parametrize("page", PAGES, ids=_ids(PAGES))
def test_relative_links_and_named_paths_exist(page):
    text = page.read_text()
    missing = []
    for target in LINK.findall(text):
        if re.match(r"^[a-z]+:", target) or target.startswith("#"):
            continue  # a web address, or a heading of this page
        path = target.split("#")[0]
        if not (page.parent / path).exists():
            missing.append(f"link {target}")
    for span in CODE.findall(text):
        span = span.strip().rstrip(".,:;")
        if REPO_PATH.match(span) and not PLACEHOLDER.search(span) and "*" not in span:
            if not (ROOT / span).exists():
                missing.append(f"path {span}")
    assert not missing, f"{page.name} names what the repository does not hold: {missing}"


def _commands(text: str) -> list[str]:
    """Every `domix …` command of a page: lines of its code blocks (continuations joined) and inline code."""
    found = []
    for block in FENCE.findall(text):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip().removeprefix("$ ")
            if line.startswith("domix "):
                found.append(line)
    found += [s for s in CODE.findall(text) if s.startswith("domix ")]
    # a command ends where the shell goes on to something else
    return [" ".join(re.split(r"\s(?:#|\||&&|;|>|2>)(?:\s|$)", c)[0].split()) for c in found]


def _check(parser, words: list[str]) -> list[str]:
    """What in `words` (a command without `domix`) the parser does not know."""
    problems = []
    while words and parser._subparsers is not None:
        sub = next(a for a in parser._subparsers._group_actions if a.choices)
        if words[0] not in sub.choices:
            if not PLACEHOLDER.search(words[0]) and not words[0].startswith("-"):
                problems.append(f"no subcommand '{words[0]}' (known: {', '.join(sub.choices)})")
            if not words[0].startswith("-"):
                return problems
            break
        parser, words = sub.choices[words[0]], words[1:]
    options = parser._option_string_actions
    for i, w in enumerate(words):
        if not w.startswith("--"):
            continue
        flag, _, value = w.partition("=")
        if flag not in options:
            problems.append(f"no option {flag} of '{parser.prog}'")
            continue
        action = options[flag]
        value = value or (words[i + 1] if i + 1 < len(words) and not words[i + 1].startswith("-") else "")
        if action.choices and action.nargs is None and value and not PLACEHOLDER.search(value):
            if value not in action.choices:
                problems.append(f"{flag} {value} is not one of {list(action.choices)}")
    return problems


@pytest.mark.parametrize("page", PAGES, ids=_ids(PAGES))
def test_every_command_shown_parses(page):
    parser = build_parser()
    problems = {}
    for command in _commands(page.read_text()):
        try:
            words = shlex.split(command)[1:]
        except ValueError:  # an unbalanced quote in prose: not a command
            continue
        if found := _check(parser, words):
            problems[command] = found
    assert not problems, f"{page.name} shows commands the CLI does not take: {problems}"


def test_the_check_catches_a_wrong_command():
    parser = build_parser()
    assert _check(parser, ["finetune", "--lora-rank", "8", "--method", "domix"]) == []
    assert _check(parser, ["library", "list", "lib/"]) == []
    assert _check(parser, ["finetune", "--no-such-option", "1"]) == ["no option --no-such-option of 'domix finetune'"]
    assert _check(parser, ["finetune", "--method", "lorax"])[0].startswith("--method lorax is not one of")
    assert _check(parser, ["libary", "list"])[0].startswith("no subcommand 'libary'")
    assert _commands("run `domix pretrain --rank 8` then\n```bash\ndomix export --model m \\\n  --out o  # note\n```\n") \
        == ["domix export --model m --out o", "domix pretrain --rank 8"]
