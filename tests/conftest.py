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
