"""The snapshot of a module's plain attributes (diagnostics/state.ModuleAttributes): what a ``training_step`` or a
forward changes is put back (rebinding by identity, in-place changes by value, in submodules too), and what torch
and Lightning own is left alone."""

from __future__ import annotations

from collections import deque

import lightning.pytorch as L
import pytest
import torch
from torch import nn

from lightning_recipe.diagnostics.state import (
    ModuleAttributes,
    TrainingState,
    attributes_preserved,
    eval_mode,
    evaluating,
    preserved,
)


class Child(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 2)
        self.counter = 0
        self.cache: dict[str, torch.Tensor] = {}


class Stateful(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.child = Child()
        self.hidden: tuple[torch.Tensor, torch.Tensor] | None = (torch.zeros(3), torch.ones(3))
        self.history: list[float] = [1.0]
        self.seen: set[int] = {1}
        self.window: deque[int] = deque([1, 2], maxlen=3)
        self.nested = {"losses": [torch.tensor(1.0)], "pair": (torch.zeros(2), [0])}
        self.name = "model"


def test_rebinding_is_restored_by_identity():
    m = Stateful()
    hidden, name = m.hidden, m.name
    state = ModuleAttributes.capture(m)
    m.hidden = (torch.randn(3), torch.randn(3))
    m.name = "other"
    m.child.counter += 5
    state.restore()
    assert m.hidden is hidden
    assert m.name is name
    assert m.child.counter == 0


def test_tensor_changed_in_place_is_restored_by_value_and_an_untouched_one_is_not_written():
    m = Stateful()
    h, c = m.hidden
    state = ModuleAttributes.capture(m)
    h.add_(7.0)  # the same object, changed in place
    c_version = c._version
    state.restore()
    assert m.hidden[0] is h and torch.equal(h, torch.zeros(3))
    assert c._version == c_version, "a tensor nobody changed must not be written (a graph may have saved it)"


def test_tensor_resized_in_place_is_restored():
    m = Stateful()
    h = m.hidden[0]
    state = ModuleAttributes.capture(m)
    h.resize_(5)
    state.restore()
    assert h.shape == (3,) and torch.equal(h, torch.zeros(3))


def test_containers_are_restored_in_place_recursively():
    m = Stateful()
    history, seen, window, nested, losses = m.history, m.seen, m.window, m.nested, m.nested["losses"]
    state = ModuleAttributes.capture(m)
    m.history.append(2.0)
    m.seen.add(2)
    m.window.append(3)
    m.nested["new"] = 1
    m.nested["losses"].append(torch.tensor(2.0))
    m.nested["losses"][0].mul_(10)
    m.nested["pair"][0].fill_(4.0)  # a tensor in a tuple in a dict
    m.nested["pair"][1].append(1)  # a list in a tuple in a dict
    state.restore()
    assert m.history is history and history == [1.0]
    assert m.seen is seen and seen == {1}
    assert m.window is window and list(window) == [1, 2] and window.maxlen == 3
    assert m.nested is nested and set(nested) == {"losses", "pair"}
    assert nested["losses"] is losses and len(losses) == 1 and losses[0].item() == 1.0
    assert torch.equal(nested["pair"][0], torch.zeros(2)) and nested["pair"][1] == [0]


def test_submodule_attributes_are_restored():
    m = Stateful()
    cache = m.child.cache
    state = ModuleAttributes.capture(m)
    m.child.counter += 1
    m.child.cache["k"] = torch.ones(1)
    m.child.extra = "added"
    state.restore()
    assert m.child.counter == 0
    assert m.child.cache is cache and cache == {}
    assert not hasattr(m.child, "extra"), "an attribute added since the capture is removed"


def test_added_attribute_removed_and_deleted_one_back():
    m = Stateful()
    state = ModuleAttributes.capture(m)
    m.scratch = [1]
    del m.name
    state.restore()
    assert not hasattr(m, "scratch")
    assert m.name == "model"


def test_a_cycle_in_a_container_does_not_loop():
    m = Stateful()
    m.history.append(m.history)  # a list holding itself
    state = ModuleAttributes.capture(m)
    m.history.append(3.0)
    state.restore()
    assert len(m.history) == 2 and m.history[1] is m.history


def test_what_torch_owns_is_left_alone():
    """Parameters, buffers, submodules, hooks, the train/eval flag and `.compile()`'s compiled call are torch's:
    the attribute snapshot neither records nor restores them."""
    m = Stateful()
    m.refs = [m.child.lin.weight]  # a parameter in a plain list: TrainingState's, never cloned here
    state = ModuleAttributes.capture(m)
    assert all(t.tensor is not m.child.lin.weight for t in state.tensors)
    recorded = {name for _, plain, _ in state.entries for name in plain}
    assert {"_parameters", "_buffers", "_modules", "_forward_hooks", "training"}.isdisjoint(recorded)
    handle = m.register_forward_hook(lambda *a: None)
    m.register_buffer("late", torch.zeros(1))
    m.eval()
    m.compile(backend="eager")  # sets `_compiled_call_impl`; compiles nothing until called
    state.restore()
    assert len(m._forward_hooks) == 1, "a hook registered since the capture is its owner's to remove"
    assert "late" in m._buffers
    assert m.training is False and m.child.training is False
    assert m._compiled_call_impl is not None
    handle.remove()


def test_a_compile_wrapper_is_skipped_but_the_module_inside_is_restored():
    inner = Stateful()
    wrapped = torch.compile(inner, backend="eager")
    state = ModuleAttributes.capture(wrapped)
    assert all(type(owner).__name__ != "OptimizedModule" for owner, _, _ in state.entries)
    inner.history.append(5.0)
    state.restore()
    assert inner.history == [1.0]


class LitStateful(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.lin = nn.Linear(2, 1)
        self.steps_seen = 0

    def training_step(self, batch, batch_idx):
        self.steps_seen += 1
        return self.lin(batch[0]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 2)), batch_size=4)


def test_what_lightning_owns_is_left_alone():
    """Measured on a LightningModule inside a real fit: only the user's own attributes are recorded, never the
    trainer link, the current hook name, the hyperparameters or Lightning's other bookkeeping."""
    recorded: dict[str, object] = {}

    class Probe(L.Callback):
        def on_train_start(self, trainer, pl_module):
            state = ModuleAttributes.capture(pl_module)
            recorded.update({o: p for o, p, _ in state.entries}[pl_module])
            pl_module._current_fx_name = "changed-by-lightning"
            state.restore()
            recorded["fx_after_restore"] = pl_module._current_fx_name

    model = LitStateful()
    L.Trainer(
        max_steps=1,
        callbacks=[Probe()],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    ).fit(model)
    assert set(recorded) == {"steps_seen", "fx_after_restore"}
    assert recorded["fx_after_restore"] == "changed-by-lightning"


def test_training_state_and_preserved_cover_attributes():
    m = Stateful()
    hidden = m.hidden
    with preserved(m):
        m.hidden = None
        m.child.counter = 3
        m.history.append(9.0)
    assert m.hidden is hidden and m.child.counter == 0 and m.history == [1.0]
    state = TrainingState.capture(m)
    m.child.cache["x"] = torch.zeros(1)
    state.restore()
    assert m.child.cache == {}


def test_attributes_preserved_restores_when_the_body_raises():
    m = Stateful()
    with pytest.raises(RuntimeError), attributes_preserved(m):
        m.history.clear()
        raise RuntimeError("user code")
    assert m.history == [1.0]


@pytest.mark.parametrize("switch", [eval_mode, evaluating, preserved])
def test_every_submodules_own_mode_is_put_back_when_the_body_raises(switch):
    """Per module: a `.train()` on the root afterwards would switch on the BatchNorm the user keeps frozen."""
    m = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2), nn.Dropout()).train()
    m[1].eval()
    with pytest.raises(RuntimeError), switch(m):
        m.eval()  # what a check does inside `preserved`; already so inside the other two
        raise RuntimeError("user code")
    assert [s.training for s in m.modules()] == [True, True, False, True]


def test_evaluating_runs_without_gradients_and_leaves_rng_and_attributes_as_found():
    m = Stateful()
    torch.manual_seed(0)
    with evaluating(m):
        assert not m.training and not torch.is_grad_enabled()
        torch.randn(3)
        m.child.counter += 1
    drawn = torch.randn(3)
    torch.manual_seed(0)
    assert torch.equal(drawn, torch.randn(3))
    assert m.child.counter == 0


def test_a_view_of_a_parameter_is_left_to_the_parameter_snapshot():
    """`self.row = self.lin.weight[0]` shares the parameter's storage: writing it back between a check's training
    steps would undo the training; TrainingState restores the parameter, and so the view."""
    m = Stateful()
    m.row = m.child.lin.weight.detach()[0]
    before = m.child.lin.weight.detach().clone()
    state = TrainingState.capture(m)
    assert all(t.tensor is not m.row for t in state.attributes.tensors)
    with torch.no_grad():
        m.child.lin.weight.add_(1.0)
    state.attributes.restore()
    assert torch.equal(m.child.lin.weight, before + 1.0), "the attributes alone do not touch the parameter"
    state.restore()
    assert torch.equal(m.child.lin.weight, before) and torch.equal(m.row, before[0])
