import pytest
import torch
from support.pipeline import tiny_dataset, train_args


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def one_thread():
    """Run the test with one intra-op thread (restored afterwards)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """The tiny synthetic dataset (support.pipeline.tiny_dataset), once per test module."""
    return tiny_dataset(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def trained(data_root, tmp_path_factory):
    """A run directory after one epoch of the tiny model (``python -m deformable_detr train``), once per module."""
    from deformable_detr.cli import main

    out = tmp_path_factory.mktemp("run")
    assert main(train_args(data_root, out, "--epochs", "1")) == 0
    return out
