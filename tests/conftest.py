"""Shared fixtures, and the `numerics` marker on every test whose result depends on floating-point
order (kernels, devices): .ci/run runs those under each CPU kernel set the machine offers."""
import pytest

from brainvq.data.demo import build_demo_dataset

# Modules that only check files, messages and exit codes, or arithmetic on plain Python numbers.
NOT_NUMERIC = {"test_bad_checkpoints.py", "test_bad_data_cli.py", "test_bench.py"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.name not in NOT_NUMERIC:
            item.add_marker(pytest.mark.numerics)


@pytest.fixture(scope="session")
def tiny_data_root(tmp_path_factory):
    """2/1/1 pseudo-subjects × 4 slices of real (MNI152-derived) brain MRI."""
    return build_demo_dataset(tmp_path_factory.mktemp("data") / "oasis", n_train=2,
                              n_validate=1, n_test=1, slices_per_subject=4)
