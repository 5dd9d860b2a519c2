"""The cause the leakage probe reads from its evidence (``LeakageReport.cause``), on models whose bug is known,
and the callback's one table that words each cause."""

from __future__ import annotations

import pytest
import torch

from lightning_recipe.callbacks.batch_leakage_probe import _HINTS
from lightning_recipe.diagnostics.leakage import LeakCause, probe_batch_leakage
from tests.graph_models import GCN, sbm_graph
from tests.test_leakage import BatchMean, OneLeak, PerExampleMLP, TinyLM, ViewScramble, _probe, _tokens


@pytest.mark.parametrize(
    ("model", "x", "cause"),
    [
        (PerExampleMLP(), torch.randn(16, 6), LeakCause.NONE),
        (ViewScramble(), torch.randn(8, 5, 3), LeakCause.TIME_FIRST_LAYER),
        (BatchMean(), torch.randn(10, 6), LeakCause.BATCH_REDUCTION),
        (OneLeak(), torch.randn(16, 6), LeakCause.BATCH_SCRAMBLE),
    ],
    ids=["per_example", "batch_first_false_layer", "mean_over_batch", "one_pair"],
)
def test_batch_causes_are_read_from_the_evidence(model, x, cause):
    torch.manual_seed(0)
    report = _probe(model, x)
    assert report.cause is cause
    assert report.first_mixing_time_first == (cause is LeakCause.TIME_FIRST_LAYER)


@pytest.mark.parametrize(
    ("diagonal", "cause"), [(None, LeakCause.FUTURE_SEEN), (2, LeakCause.FUTURE_OFF_BY_ONE), (1, LeakCause.NONE)]
)
def test_causal_causes_tell_a_missing_mask_from_one_off_by_one(diagonal, cause):
    torch.manual_seed(0)
    x, y = _tokens()
    assert _probe(TinyLM(diagonal=diagonal), x, targets=y).cause is cause


def test_a_graph_leak_is_a_dependency_beyond_the_neighbourhood():
    torch.manual_seed(0)
    g = sbm_graph()
    report = probe_batch_leakage(GCN(bug="softmax_over_nodes"), (g["x"], g["adj"]), lambda m, x: m(*x), targets=g["y"])
    assert report.cause is LeakCause.BEYOND_NEIGHBOURHOOD


def test_the_callback_words_every_cause_but_none_in_one_table():
    assert set(_HINTS) == set(LeakCause) - {LeakCause.NONE}
