"""The README is the user's guide: every command it shows exists, its config block is the shipped config,
and every file it links is in the repository."""
import re
import shlex
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = [README, *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "README.md"]


def _code(text: str) -> list[str]:
    """Code the README shows: fenced blocks and inline spans."""
    fenced = re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S)
    rest = re.sub(r"```[a-z]*\n.*?```", "", text, flags=re.S)
    return fenced + re.findall(r"`([^`\n]+)`", rest)


def _subcommands() -> dict[str, set[str]]:
    """Each `vitrim` subcommand and its options, from the real parser."""
    from vitrim.pipeline.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction")
    return {name: {o for a in p._actions for o in a.option_strings} for name, p in sub.choices.items()}


def _vitrim_calls(text: str) -> list[list[str]]:
    calls = []
    for code in _code(text):
        for line in code.replace("\\\n", " ").splitlines():
            # a command: vitrim at the start of a line (after a prompt or a path), after && ; ||, or -m vitrim
            m = re.search(r"(?:^\s*(?:\$\s*)?(?:\S*/)?|(?:&&|;|\|\|)\s*(?:\S*/)?|-m )vitrim ([a-z][a-z-]*)(.*)", line)
            if m:
                args = m.group(2).split("#")[0].split(";")[0].split("&&")[0].split("|")[0]
                try:
                    words = shlex.split(args)
                except ValueError:
                    words = args.split()
                calls.append([m.group(1), *words])
    return calls


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_command_shown_exists(doc):
    text = doc.read_text()
    subs = _subcommands()
    calls = _vitrim_calls(text)
    if doc == README:
        assert len(calls) >= 10, calls  # the README shows the commands: a parser that found none is broken
    for sub, *words in calls:
        assert sub in subs, f"{doc.name}: `vitrim {sub}` is not a subcommand ({sorted(subs)})"
        for w in words:
            if w.startswith("--"):
                assert w.split("=")[0] in subs[sub], f"{doc.name}: `vitrim {sub}` has no option {w}"
    make_targets = set(re.findall(r"^([a-z][a-z-]*):", (ROOT / "Makefile").read_text(), flags=re.M))
    for code in _code(text):
        for target in re.findall(r"(?:^|\s)make ([a-z][a-z-]*)", code):
            assert target in make_targets, f"{doc.name}: `make {target}` is not a Makefile target"
        for path in re.findall(r"((?:benchmarks|configs|tests|docs)/[\w./-]+\.(?:py|yaml|md))", code):
            assert (ROOT / path).is_file(), f"{doc.name}: {path} does not exist"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_linked_files_exist(doc):
    for link in re.findall(r"\]\(([^)#:]+)\)", doc.read_text()):
        assert (doc.parent / link).exists(), f"{doc.name} links {link}, which does not exist"


def test_readme_is_a_guide_not_a_notebook():
    lines = README.read_text().splitlines()
    assert len(lines) <= 300, f"README.md has {len(lines)} lines: results go to benchmarks/, details to docs/"


def test_config_doc_block_is_the_shipped_config():
    text = (ROOT / "docs" / "configuration.md").read_text()
    marker = text.index("<!-- the shipped config")
    block = re.search(r"```yaml\n(.*?)```", text[marker:], flags=re.S).group(1)
    shipped = (ROOT / "configs" / "fmnist_cpu.yaml").read_text()
    assert yaml.safe_load(block) == yaml.safe_load(shipped)
    assert block.strip() == shipped.strip()  # comments included: the README shows the file


def test_the_checker_flags_what_it_exists_to_catch():
    assert _vitrim_calls("```bash\nvitrim frobnicate x\n```") == [["frobnicate", "x"]]
    assert "frobnicate" not in _subcommands()
    assert ["run", "configs/fmnist_cpu.yaml", "--nope", "1"] in _vitrim_calls("`vitrim run configs/fmnist_cpu.yaml --nope 1`")
    assert "--nope" not in _subcommands()["run"]
