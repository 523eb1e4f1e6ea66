"""Fixtures of the search tests: a small real Fashion-MNIST slice."""
import pytest


@pytest.fixture(scope="module")
def data(fmnist_dir):
    from vitrim.pipeline.core.config import DataConfig
    from vitrim.pipeline.core.data import build_splits

    return build_splits(DataConfig(root=fmnist_dir, train_limit=512, val_limit=128, test_limit=128))
