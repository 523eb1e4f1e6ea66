"""The engines vitrim measures and ships to: one module a backend, each registered in :data:`BACKENDS`.

Adding a backend is one module here (a :class:`Backend` subclass, registered) plus its
tests; nothing outside this package tests a backend's name.
"""
from vitrim.export.backends.base import BACKENDS, Backend, Engine, TritonSpec, cpu_flags, cpu_name, get_backend, names
from vitrim.export.backends import ort_cpu, openvino, tensorrt, torch  # noqa: F401,E402  (each registers itself)

__all__ = ["BACKENDS", "Backend", "Engine", "TritonSpec", "cpu_flags", "cpu_name", "get_backend", "names"]
