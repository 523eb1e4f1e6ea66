"""Every documented benchmark command runs, in smoke mode (``--smoke``: tiny sizes, seconds; benchmarks/smoke.py).

The commands are read from the docs themselves (README.md, benchmarks/README.md, docs/*.md: code blocks and inline
code that start with ``python`` or ``.venv/bin/python``), so a refactor that breaks one, or a doc that names a flag
the script lacks, fails here. Each runs in this process (one interpreter start less) with ``--out`` in tmp_path and
a shared cache (``--set cache_dir=`` for a config-driven script, ``--cache-dir`` for one that takes it); a
``--baseline-dir`` that names another command's ``--out`` reads that command's smoke output.

The commands export the same module again and again (the shared teacher, released by every pipeline run):
:func:`export_onnx` runs once per distinct module in this file (keyed by :func:`vitrim.export.engine._module_key`,
the profiler's own export cache key, and the export's arguments) and a repeat gets a copy of that file.
"""
from __future__ import annotations

import re
import runpy
import shlex
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "benchmarks" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SCRIPTS = sorted(p.name for p in (ROOT / "benchmarks").glob("*.py") if p.name != "smoke.py")
# Commands the docs keep as the record of an earlier version of a script (each says so beside it); their flags
# are gone, so they do not run. The test checks they are still there, and still say so.
HISTORICAL = {
    "benchmarks/deit_shapes.py --models deit_tiny,deit_small --plans 15 --grid embed=2,heads=3,qk=2,v=2,mlp=3 "
    "--repeats 12 --rounds 4 --warmup 2 --checks 3 --out runs/deit_shapes": "the script as it was then",
}


def documented() -> list[str]:
    """Every benchmark command in the docs, normalised (no interpreter, one space, no comment), in order."""
    found: list[str] = []
    for doc in DOCS:
        text = doc.read_text()
        spans = []
        for block in re.findall(r"```[a-z]*\n(.*?)```", text, re.S):
            spans += block.replace("\\\n", " ").splitlines()
        spans += re.findall(r"`([^`]+)`", re.sub(r"```.*?```", "", text, flags=re.S).replace("\n", " "))
        for s in spans:
            s = " ".join(s.split("#")[0].split())
            m = re.match(r"(?:\.venv/bin/)?python3? (benchmarks/\w+\.py.*)", s)
            if m and m.group(1) not in found:
                found.append(m.group(1))
    return found


def _key(cmd: str) -> str:
    """A command without its --out: two docs naming the same run in other folders run it once."""
    return re.sub(r" --out \S+", "", cmd)


def _out(cmd: str) -> str | None:
    m = re.search(r" --out (\S+)", cmd)
    return m.group(1) if m else None


COMMANDS = [c for c in documented() if c not in HISTORICAL]
_kept: dict[str, str] = {}
for _c in COMMANDS:
    _kept.setdefault(_key(_c), _c)
# a dropped duplicate's --out is its kept twin's (a --baseline-dir may name either)
ALIASES = {_out(c): _out(_kept[_key(c)]) for c in COMMANDS if c not in _kept.values() and _out(c)}
_bases = {ALIASES.get(b, b) for b in re.findall(r" --baseline-dir (\S+)", " ".join(COMMANDS))}
UNIQUE = sorted(_kept.values(), key=lambda c: _out(c) not in _bases)  # what a --baseline-dir reads runs first


def test_the_docs_name_every_benchmark_script_and_mark_old_commands():
    named = {c.split()[0].split("/")[1] for c in COMMANDS}
    assert named == set(SCRIPTS), f"benchmark scripts no doc runs: {set(SCRIPTS) - named}"
    text = " ".join(" ".join(d.read_text().split()) for d in DOCS)
    for cmd, label in HISTORICAL.items():
        assert cmd in text and label in text, cmd


@pytest.fixture(scope="module")
def outs(tmp_path_factory):
    return {"_root": tmp_path_factory.mktemp("bench"), "_cache": tmp_path_factory.mktemp("bench_cache"),
            "_exports": {"_dir": tmp_path_factory.mktemp("bench_exports")}}


def _export_once(real, done: dict):
    """``export_onnx`` that exports each distinct module once (``done``: key -> its first file) and copies it after."""
    import shutil

    from vitrim.export.engine import _module_key
    from vitrim.pipeline.core.io import atomic_save

    def export_onnx(model, path, input_shape, *args, **kwargs):
        key = _module_key(model.eval(), tuple(input_shape))
        key = key and (key, args, tuple(sorted(kwargs.items())))
        first = done.get(key) if key else None
        if first is not None and first.is_file():
            atomic_save(path, lambda tmp: shutil.copyfile(first, tmp))
            return Path(path)
        out = real(model, path, input_shape, *args, **kwargs)
        if key:
            keep = done["_dir"] / f"{len(done)}.onnx"
            shutil.copyfile(out, keep)
            done[key] = keep
        return out
    return export_onnx


@pytest.mark.slow
@pytest.mark.parametrize("cmd", UNIQUE, ids=[c.split()[0].split("/")[1] + str(i) for i, c in enumerate(UNIQUE)])
def test_documented_benchmark_command_runs_in_smoke_mode(cmd, outs, fmnist_dir, monkeypatch, capsys):
    args = shlex.split(cmd)
    script = ROOT / args.pop(0)
    root = outs["_root"]
    for flag in ("--out", "--baseline-dir"):
        if flag in args:
            i = args.index(flag) + 1
            if flag == "--out":
                outs[args[i]] = root / f"out{len(outs)}"
            args[i] = str(outs.get(ALIASES.get(args[i], args[i]), root / "missing"))
    if "--baseline-dir" in args:  # another documented command's output
        assert Path(args[args.index("--baseline-dir") + 1]).is_dir(), f"{cmd}: run the command writing it first"
    src = script.read_text()
    if 'add_argument("--set"' in src:  # a config-driven script: the shared cache and the installed Fashion-MNIST
        args += ["--set", f"cache_dir={outs['_cache']}", "--set", f"data.root={fmnist_dir}"]
    elif 'add_argument("--cache-dir"' in src and "--cache-dir" not in args:  # the same shared cache
        args += ["--cache-dir", str(outs["_cache"])]
    import vitrim.export.onnx

    monkeypatch.setattr(vitrim.export.onnx, "export_onnx", _export_once(vitrim.export.onnx.export_onnx,
                                                                         outs["_exports"]))
    monkeypatch.setenv("VITRIM_FMNIST_DIR", fmnist_dir)
    monkeypatch.syspath_prepend(str(script.parent))
    monkeypatch.setattr(sys, "argv", [str(script), *args, "--smoke"])
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as e:
        runpy.run_path(str(script), run_name="__main__")
    assert e.value.code in (0, None), f"{cmd} --smoke exited {e.value.code}:\n{capsys.readouterr().err[-3000:]}"
