"""Packaging and layering: vitrim installs under one namespace and imports point one way.

* Nothing installs a top-level ``pipeline``, ``export`` or ``profiling``; a
  user's own ``pipeline.py`` next to them changes nothing.
* core <- export <- profiling <- search <- stages: parsed from every module's imports, and no module
  imports itself back through others (no cycle).
* Strategies and backends register: nothing outside the registry (``export/backends/`` for backends) compares
  a value with a strategy's or a backend's name; group keys
  are typed (no ``b{i}.`` strings outside ``search/groups.py``); run artifacts are named by ``RunDir``.
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
        return parts[2] if parts[2] in ("core", "search") else "stages"  # stages/, report.py and cli.py
    return parts[1] if parts[1] in ("export", "profiling") else None  # vitrim/__main__ is the entry point


_RANK = {"core": 0, "pipeline": 0, "export": 1, "profiling": 2, "search": 3, "stages": 4}


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
             "vitrim.pipeline.search.bad": "from vitrim.pipeline.stages.search import stage_search\n",
             "vitrim.profiling.bad2": "from vitrim.pipeline.search import run_search\n",
             "vitrim.pipeline.core.bare": "from pipeline.core.plan import Plan\n"}
    for i, (mod, src) in enumerate(cases.items()):
        f = tmp_path / f"m{i}.py"
        f.write_text(src)
        assert len(violations([(mod, f)])) == 1, mod
    ok = tmp_path / "ok.py"
    ok.write_text("from vitrim.pipeline.core.plan import Plan\nfrom vitrim.export.target import Target\n")
    assert violations([("vitrim.profiling.ok", ok)]) == []


def import_graph(mods) -> dict[str, set[str]]:
    """{module: the vitrim modules it imports} (function-level imports included; ``from pkg import name`` counts
    as importing ``pkg.name`` when that is a module)."""
    names = {m for m, _ in mods}
    graph = {}
    for mod, path in mods:
        deps = set()
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name in names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                subs = {f"{node.module}.{a.name}" for a in node.names} & names
                deps |= subs or ({node.module} & names)
        graph[mod] = deps - {mod}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    """Two modules that import each other (even inside functions) are one concept split badly, or a missing layer."""
    found = cycles(import_graph(list(_modules())))
    assert not found, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_cycle_check_catches_a_cycle(tmp_path):
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("def f():\n    from vitrim.pipeline.search.b import g\n")
    b.write_text("from vitrim.pipeline.search import a\n")
    mods = [("vitrim.pipeline.search", tmp_path / "init.py"), ("vitrim.pipeline.search.a", a),
            ("vitrim.pipeline.search.b", b)]
    (tmp_path / "init.py").write_text("")
    assert cycles(import_graph(mods)) == [["vitrim.pipeline.search.a", "vitrim.pipeline.search.b"]]


# --- strategies register; keys are typed; run artifacts are named in one place ----------------------------------

STRATEGY_NAMES = ("knapsack", "nvit", "slim", "uvc", "uniform", "magnitude", "compound")
# the registry, and the config's validation of the names it accepts
REGISTRY = {ROOT / "pipeline" / "search" / "__init__.py", ROOT / "pipeline" / "core" / "config.py"}


def name_tests(path: Path) -> list[str]:
    """Comparisons of anything with a strategy's name (``x == "slim"``, ``s in ("knapsack", "nvit")``)."""
    bad = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(node, ast.Compare):
            continue
        for side in (node.left, *node.comparators):
            consts = side.elts if isinstance(side, (ast.Tuple, ast.List, ast.Set)) else [side]
            if any(isinstance(c, ast.Constant) and c.value in STRATEGY_NAMES for c in consts):
                bad.append(f"{path}:{node.lineno}: compares with a strategy name ({ast.unparse(node)})")
                break
    return bad


def test_only_the_registry_tests_strategy_names():
    from vitrim.pipeline.search import STRATEGIES

    assert set(STRATEGY_NAMES) == set(STRATEGIES)
    bad = [b for _, path in _modules() if path not in REGISTRY for b in name_tests(path)]
    assert not bad, "a strategy's name tested outside the registry (make it a Strategy attribute or method):\n" + \
        "\n".join(bad)


def test_name_test_check_catches_one(tmp_path):
    f = tmp_path / "m.py"
    for src in ('if cfg.strategy == "uvc":\n    pass\n', 'x = method in ("knapsack", "nvit")\n',
                'y = "slim" != s.strategy\n'):
        f.write_text(src)
        assert len(name_tests(f)) == 1, src
    f.write_text('name = "uvc"\nok = cfg.strategy in STRATEGIES\n')
    assert name_tests(f) == []


BACKENDS_PKG = ROOT / "export" / "backends"


def _backend_names() -> frozenset:
    """The registered names: the registry is the only list of backends."""
    from vitrim.export.backends import BACKENDS

    return frozenset(BACKENDS)


BACKEND_NAMES = _backend_names()


def backend_name_tests(path: Path) -> list[str]:
    """Comparisons of anything with a backend's name (``t.backend == "ort-cpu"``, ``b in ("torch-cpu", ...)``),
    including ``.get("backend") != "tensorrt"``."""
    bad = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(node, ast.Compare):
            continue
        for side in (node.left, *node.comparators):
            consts = side.elts if isinstance(side, (ast.Tuple, ast.List, ast.Set)) else [side]
            if any(isinstance(c, ast.Constant) and c.value in BACKEND_NAMES for c in consts):
                bad.append(f"{path}:{node.lineno}: compares with a backend name ({ast.unparse(node)})")
                break
    return bad


def backend_name_lists(path: Path) -> list[str]:
    """A tuple, list or set literal holding two or more backend names: a second registry to keep in step."""
    bad = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            hits = [c.value for c in node.elts if isinstance(c, ast.Constant) and c.value in BACKEND_NAMES]
            if len(hits) >= 2:
                bad.append(f"{path}:{node.lineno}: lists backends {hits} (use vitrim.export.backends.BACKENDS)")
    return bad


def test_only_the_backends_package_tests_backend_names():
    """A backend's name is compared inside ``export/backends/`` only: elsewhere, ask the backend (STYLE 17)."""
    assert {"ort-cpu", "openvino"} <= BACKEND_NAMES  # the registry is filled: the check below checks something
    files = [p for _, p in _modules()] + sorted((ROOT / "benchmarks").glob("*.py"))
    bad = [b for path in files if not path.is_relative_to(BACKENDS_PKG)
           for b in backend_name_tests(path) + backend_name_lists(path)]
    assert not bad, "a backend's name tested outside export/backends/ (make it a Backend attribute or method):\n" + \
        "\n".join(bad)


def test_backend_name_check_catches_one(tmp_path):
    f = tmp_path / "m.py"
    for src in ('if target.backend == "ort-cpu":\n    pass\n', 'x = b in ("torch-cpu", "torch-cuda")\n',
                'y = sig.get("backend") != "tensorrt"\n', 'z = "torch-cuda" == name\n'):
        f.write_text(src)
        assert len(backend_name_tests(f)) == 1, src
    f.write_text('name = "ort-cpu"\nok = cfg.target.backend in BACKENDS\n')
    assert backend_name_tests(f) == []
    f.write_text('NAMES = ("ort-cpu", "openvino", "tensorrt")\n')
    assert len(backend_name_lists(f)) == 1
    f.write_text('pair = ("ort-cpu", 3)\n')
    assert backend_name_lists(f) == []


def test_every_backend_module_registers_itself():
    """A backend is one file: each module of the package is imported by the package and registers a backend,
    and every registered backend comes from its own module there."""
    import pkgutil

    import vitrim.export.backends as pkg
    from vitrim.export.backends import BACKENDS

    modules = {f"{pkg.__name__}.{m.name}" for m in pkgutil.iter_modules(pkg.__path__)} - {f"{pkg.__name__}.base"}
    owners = {type(b).__module__ for b in BACKENDS.values()}
    assert owners == modules, f"modules without a backend: {modules - owners}; backends from elsewhere: {owners - modules}"


def test_group_keys_are_formatted_in_groups_only():
    """Scores, gates and masks are keyed by GroupKey; the ``b{i}.{dim}`` spelling exists for logs in groups.py only."""
    allowed = ROOT / "pipeline" / "search" / "groups.py"
    files = [p for _, p in _modules()] + sorted((ROOT / "benchmarks").glob("*.py")) + sorted((ROOT / "tests").rglob("*.py"))
    bad = [f"{p}:{i}" for p in files if p != allowed and p != Path(__file__)
           for i, line in enumerate(p.read_text().splitlines(), 1) if 'f"b{' in line or "f'b{" in line]
    assert not bad, "formatted group keys (use vitrim.pipeline.search.GroupKey):\n" + "\n".join(bad)


def artifact_names() -> set[str]:
    """The file names RunDir gives a run's artifacts."""
    from vitrim.pipeline.core.rundir import RunDir

    rd = RunDir("r")
    names = {getattr(rd, k).name for k, v in vars(RunDir).items() if isinstance(v, property)
             and isinstance(getattr(rd, k), Path)}
    return names | {rd.engine_onnx(p).name for p in ("fp16", "int8", "fp8")}


def artifact_literals(path: Path, names: set[str]) -> list[str]:
    """String literals (docstrings aside) of ``path`` that spell one of ``names``."""
    tree = ast.parse(path.read_text(), str(path))
    docs = {id(n.body[0].value) for n in ast.walk(tree)
            if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and n.body
            and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    return [f"{path}:{n.lineno}: {n.value!r}" for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docs
            and any(name in n.value for name in names)]


def test_run_artifacts_are_named_by_rundir_only():
    names = artifact_names()
    assert {"plan.json", "search_log.json", "student.safetensors", "manifest.json", "model.int8.onnx"} <= names
    pipeline = ROOT / "pipeline"
    files = [pipeline / "cli.py", pipeline / "report.py", *sorted((pipeline / "stages").glob("*.py")),
             *sorted((pipeline / "search").glob("*.py")), *sorted((ROOT / "export").glob("*.py")),
             *sorted((ROOT / "profiling").glob("*.py")),
             *(p for p in sorted((pipeline / "core").glob("*.py")) if p.name != "rundir.py")]
    # Triton's model repository names its files by Triton's own layout (model.onnx / model.plan), not a run's
    files = [p for p in files if p.name != "triton.py"]
    bad = [b for p in files for b in artifact_literals(p, names)]
    assert not bad, "run artifact names spelled outside pipeline/core/rundir.py (use a RunDir):\n" + "\n".join(bad)


def test_artifact_check_catches_a_literal(tmp_path):
    f = tmp_path / "m.py"
    f.write_text('"""Writes plan.json (a docstring may say so)."""\nout = d / "plan.json"\nmsg = f"wrote {d}/search_log.json"\n')
    assert len(artifact_literals(f, artifact_names())) == 2
