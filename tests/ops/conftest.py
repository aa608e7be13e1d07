"""One intra-op thread for the ops tests: their tensors are tiny, and on a shared, busy machine a second OpenMP
thread spinning for a core costs far more than it gives (100× slower small convolutions were measured)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="package")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
