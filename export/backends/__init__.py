"""The engines vitrim measures and ships to: one module a backend, each registered in :data:`BACKENDS`.

Adding a backend is one module here (a :class:`Backend` subclass, registered when the module is imported) plus
its tests: every module of this package is imported below, so no list of backends exists anywhere else, and
nothing outside this package tests a backend's name (``tests/test_layout.py``). A backend module imports its
engine's library lazily, inside its methods (``availability`` says when it is missing): every ``vitrim`` command
imports every backend module. A new engine's libraries also go into ``pyproject.toml`` (an extra) and
``constraints.txt``.
"""
import importlib
import pkgutil

from vitrim.export.backends.base import BACKENDS, Backend, Engine, TritonSpec, cpu_flags, cpu_name, get_backend, names

for _m in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    if _m != "base":
        importlib.import_module(f"{__name__}.{_m}")  # each module registers its backends

__all__ = ["BACKENDS", "Backend", "Engine", "TritonSpec", "cpu_flags", "cpu_name", "get_backend", "names"]
