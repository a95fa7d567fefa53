"""io tests run torch single-threaded: their models are tiny, and on a busy 2-core machine two OpenMP
threads made a SmolLM2 forward pass 25x slower (3.6 s vs 0.15 s) than one."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="package")
def _one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
