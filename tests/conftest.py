import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from datagen import write_fashion_mnist  # noqa: E402


@pytest.fixture(scope="session")
def tiny_fmnist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A generated Fashion-MNIST stand-in (IDX files, 300 train and 40 test images per class); use it
    as ``data.root`` with ``data.limit_per_class`` set."""
    return write_fashion_mnist(tmp_path_factory.mktemp("fashion-mnist"))


# Tests never reach the model hub: set before any test module imports huggingface_hub.
__import__("os").environ.setdefault("HF_HUB_OFFLINE", "1")
