"""Shared fixtures: one tiny demo dataset per test session."""
import pytest

from dataset import build_demo_dataset


@pytest.fixture(scope="session")
def tiny_data_root(tmp_path_factory):
    """2/1/1 pseudo-subjects × 4 slices of real (MNI152-derived) brain MRI."""
    return build_demo_dataset(tmp_path_factory.mktemp("data") / "oasis", n_train=2,
                              n_validate=1, n_test=1, slices_per_subject=4)
