"""Fixtures shared by the profiling tests: the session's tiny teacher spec and its real ORT-CPU LUT."""
import pytest


@pytest.fixture(scope="module")
def spec(tiny_spec):
    return tiny_spec


@pytest.fixture(scope="module")
def built(tiny_lut):
    return tiny_lut
