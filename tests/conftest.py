import pytest
import torch


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same global RNG state and the default dtype."""
    torch.manual_seed(0)
    yield
    torch.set_default_dtype(torch.float32)
