"""Packaging and layering: vitrim installs under one namespace and imports point one way.

* Nothing installs a top-level ``pipeline``, ``export`` or ``profiling``; a
  user's own ``pipeline.py`` next to them changes nothing.
* core <- export <- profiling <- stages: parsed from every module's imports.
"""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.fixture
def shadow_dir(tmp_path):
    for name in ("pipeline", "export", "profiling"):
        (tmp_path / f"{name}.py").write_text(f"raise RuntimeError('the user\\'s own {name}.py was imported')\n")
    return tmp_path


def _run(cmd, cwd):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120, env=env)


def test_commands_work_next_to_users_pipeline_py(shadow_dir):
    for cmd in ([str(BIN / "vitrim"), "--help"], [sys.executable, "-m", "vitrim", "--help"],
                [sys.executable, "-m", "vitrim.pipeline.cli", "--help"],
                [sys.executable, "-c", "import vitrim.pipeline, vitrim.export, vitrim.profiling"]):
        p = _run(cmd, shadow_dir)
        assert p.returncode == 0, (cmd, p.stderr[-1500:])
        assert "was imported" not in p.stderr
    p = _run([str(BIN / "vitrim"), "--version"], shadow_dir)
    assert p.returncode == 0 and p.stdout.startswith("vitrim ")


def test_no_top_level_packages_installed(tmp_path):
    code = ("import importlib.util as u; "
            "print([n for n in ('pipeline', 'export', 'profiling') if u.find_spec(n) is not None])")
    p = _run([sys.executable, "-c", code], tmp_path)
    assert p.returncode == 0 and p.stdout.strip() == "[]", p.stdout + p.stderr


# --- layering ---------------------------------------------------------------------------------------------------

def _layer(module: str) -> str | None:
    """The layer of a ``vitrim.*`` module name (None for the ``vitrim`` package itself)."""
    parts = module.split(".")
    if parts[0] != "vitrim" or len(parts) < 2:
        return None
    if parts[1] == "pipeline":
        if len(parts) == 2:
            return "pipeline"  # the namespace package (re-exports core errors)
        return "core" if parts[2] == "core" else "stages"  # stages/ and cli.py
    return parts[1] if parts[1] in ("export", "profiling") else None  # vitrim/__main__ is the entry point


_RANK = {"core": 0, "pipeline": 0, "export": 1, "profiling": 2, "stages": 3}


def _modules():
    for folder, pkg in (("pipeline", "vitrim.pipeline"), ("export", "vitrim.export"), ("profiling", "vitrim.profiling"),
                        ("src/vitrim", "vitrim")):
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            yield ".".join([pkg, *parts]), path


def _imports(path: Path):
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):  # function-level imports count too
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, node.lineno
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module, node.lineno
        elif isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(f"{path}:{node.lineno}: relative import; use absolute vitrim.* imports")


def violations(mods) -> list[str]:
    """Every import in ``mods`` ((module name, path) pairs) that points up a layer, or is a bare top-level name."""
    bad = []
    for mod, path in mods:
        src = _layer(mod)
        for imported, line in _imports(path):
            top = imported.split(".")[0]
            if top in ("pipeline", "export", "profiling"):
                bad.append(f"{path}:{line}: bare '{imported}' (use vitrim.{imported})")
                continue
            dst = _layer(imported)
            if dst is None or src is None:
                continue
            if _RANK[dst] > _RANK[src]:
                bad.append(f"{path}:{line}: {src} module {mod} imports {dst} module {imported}")
    return bad


def test_imports_point_one_way():
    mods = list(_modules())
    assert len(mods) > 20
    bad = violations(mods)
    assert not bad, "layering violations:\n" + "\n".join(bad)


def test_layering_check_catches_a_violation(tmp_path):
    # the same checker, fed modules that break the rule, must flag each of them
    cases = {"vitrim.export.bad": "def f():\n    from vitrim.profiling.table import LatencyTable\n",
             "vitrim.pipeline.core.bad": "from vitrim.pipeline.stages.search import run_search\n",
             "vitrim.profiling.bad": "import vitrim.pipeline.stages.run\n",
             "vitrim.pipeline.core.bare": "from pipeline.core.plan import Plan\n"}
    for i, (mod, src) in enumerate(cases.items()):
        f = tmp_path / f"m{i}.py"
        f.write_text(src)
        assert len(violations([(mod, f)])) == 1, mod
    ok = tmp_path / "ok.py"
    ok.write_text("from vitrim.pipeline.core.plan import Plan\nfrom vitrim.export.target import Target\n")
    assert violations([("vitrim.profiling.ok", ok)]) == []
