"""Fixtures of the search tests: a small real Fashion-MNIST slice."""
import pytest


@pytest.fixture(scope="module")
def data(fmnist_dir):
    from vitrim.pipeline.core.config import DataConfig
    from vitrim.pipeline.core.data import build_splits

    return build_splits(DataConfig(root=fmnist_dir, train_limit=512, val_limit=128, test_limit=128))


@pytest.fixture(scope="module")
def planted_lut(tiny_spec):
    """A hand-written table (no timing) for the tests of what the search removes first: the measured tiny table
    carries the machine's noise, and on a loaded machine one head's measured saving came out at zero, so the
    search (which ranks only groups that save time) never offered the planted dead head. ``(lut, None)``, shaped
    like ``tiny_lut``."""
    from tests.pipeline.search.helpers import token_lut

    return token_lut(tiny_spec, max_merges=0), None
