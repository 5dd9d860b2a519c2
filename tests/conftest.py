import logging
import os

import pytest
import torch

# Two cores here: one intra-op thread keeps Trainer runs fast and timings independent of other tests.
torch.set_num_threads(1)
os.environ.setdefault("PYTHONHASHSEED", "0")


@pytest.fixture(autouse=True)
def _quiet_lightning():
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    yield


@pytest.fixture
def defer_reads(monkeypatch: pytest.MonkeyPatch):
    """``defer_reads(True)``: monitors read what they measured a hook later, as they read CUDA tensors (the GPU
    path, taken on the CPU); ``defer_reads(False)``: at once again, as CPU tensors are read."""
    from lightning_recipe.callbacks import _monitor

    waits = _monitor._waits_for_device

    def switch(deferred: bool) -> None:
        monkeypatch.setattr(_monitor, "_waits_for_device", (lambda tensors: True) if deferred else waits)

    return switch
