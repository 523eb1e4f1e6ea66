"""The exception hierarchy (pipeline/core/errors.py): what crosses a DataLoader worker and a benchmark's bisection."""
import pickle

from vitrim.pipeline.core.errors import UnreachableBudget, UserError


def test_errors_keep_their_type_stage_and_fix_across_processes():
    for e in (UserError("data", "image a.png is unreadable", "remove it"), UnreachableBudget("budget 1 ms", "raise it")):
        back = pickle.loads(pickle.dumps(e))
        assert type(back) is type(e) and str(back) == str(e) and back.fix == e.fix and back.stage == e.stage
    assert isinstance(UnreachableBudget("x"), UserError) and UnreachableBudget("x").stage == "search"


def test_a_worker_reraise_keeps_only_the_message():
    """torch re-raises a DataLoader worker's exception as ``type(e)(formatted_traceback)``."""
    tb = 'Caught UserError in DataLoader worker process 0.\nTraceback (most recent call last):\n  File "x.py"\n' \
         "vitrim.pipeline.core.errors.UserError: [data] image a.png is unreadable"
    e = UserError(tb)
    assert e.what == "[data] image a.png is unreadable" and str(e) == e.what


def test_install_hints_work_for_a_source_install():
    """vitrim is installed from its checkout, not the package index: `pip install 'vitrim[sign]'` cannot work."""
    import tomllib
    from pathlib import Path

    from vitrim.pipeline.core.errors import install_hint

    extras = tomllib.loads((Path(__file__).resolve().parents[3] / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    for extra in ("sign", "triton", "gpu", "simplify"):
        hint = install_hint(extra)
        assert hint.startswith(f"pip install -e '.[{extra}]' from the vitrim checkout"), hint
        assert all(p.split("[")[0].split(">")[0] in hint for p in extras[extra]), (extra, hint)
        assert "'vitrim[" not in hint


def test_a_missing_signing_package_names_the_source_install(monkeypatch):
    import builtins

    import pytest

    from vitrim.export.manifest import _crypto

    real = builtins.__import__

    def no_crypto(name, *a, **k):
        if name.startswith("cryptography"):
            raise ImportError(name)
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_crypto)
    with pytest.raises(UserError) as e:
        _crypto()
    assert "pip install -e '.[sign]'" in e.value.fix and "cryptography" in e.value.fix
