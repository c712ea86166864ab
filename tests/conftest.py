import random

import numpy as np
import pytest
import torch

# Small CPU ops gain nothing from threads, and OpenMP threads stall badly when the cores are shared.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same random state, single-threaded-deterministic where possible."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield
