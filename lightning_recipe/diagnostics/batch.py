"""Understanding a user's batch: what goes into the model, what the target is, what comes out.

Every check and monitor accepts the same three keyword arguments, ``inputs=``, ``targets=`` and
``forward=``; this module holds their defaults, the :class:`BatchAdapter` that bundles them (and, when they were
left to their defaults, finds a reading of the batch the model accepts), and the one error that names the
argument to pass. Walking the tensors inside a batch is :mod:`lightning_recipe.diagnostics.walk`'s; reading
sparse tensors and graph batches is :mod:`lightning_recipe.diagnostics.sparse`'s.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Any, NoReturn

from torch import Tensor, nn

from lightning_recipe.diagnostics.sparse import is_sparse
from lightning_recipe.diagnostics.walk import first_tensor

__all__ = [
    "BatchAdapter",
    "BatchNotUnderstood",
    "ChildForward",
    "batch_size_of",
    "call_with_batch",
    "default_forward",
    "default_inputs",
    "default_targets",
    "select_output",
    "whole_batch",
]

Inputs = Any  # a tensor, or a tuple / dict of tensors
InputsFn = Callable[[Any], Inputs]
TargetsFn = Callable[[Any], Tensor]
ForwardFn = Callable[[nn.Module, Inputs], Any]

INPUT_KEYS = ("x", "input", "inputs", "image", "images", "img", "input_ids", "features", "data", "src")
TARGET_KEYS = ("y", "target", "targets", "label", "labels", "tgt", "mask", "masks")
OUTPUT_KEYS = ("logits", "output", "outputs", "out", "pred", "preds", "prediction", "y_hat", "scores")


class BatchNotUnderstood(ValueError):
    """The batch does not have a shape the defaults understand; the message names the argument to pass."""


def default_inputs(batch: Any) -> Inputs:
    """``batch[0]`` of a tuple/list, a common input key of a dict (or field of a dataclass), or the batch itself
    if it is a tensor."""
    if isinstance(batch, Tensor):
        return batch
    batch = _fields_of(batch)
    if isinstance(batch, (tuple, list)) and batch:
        return batch[0]
    if isinstance(batch, Mapping):
        for key in INPUT_KEYS:
            if key in batch:
                return batch[key]
        raise BatchNotUnderstood(
            f"Expected a dict batch to hold the model input under one of {list(INPUT_KEYS)}, but its keys are "
            f"{list(batch)}. Pass `inputs=lambda batch: batch[...]` to say what the model takes."
        )
    raise BatchNotUnderstood(
        f"Expected the batch to be a tuple `(x, y, ...)` or a dict, but got {type(batch).__name__}. "
        "Pass `inputs=lambda batch: ...` (and `targets=`) to say what the model takes."
    )


def _fields_of(batch: Any) -> Any:
    """A dataclass batch (``Batch(x=..., y=...)``) as the dict of its fields; any other batch as it is."""
    if dataclasses.is_dataclass(batch) and not isinstance(batch, (type, Mapping)):
        return {f.name: getattr(batch, f.name) for f in dataclasses.fields(batch)}
    return batch


def default_targets(batch: Any) -> Tensor:
    """``batch[1]`` of a tuple/list, or a common target key of a dict (or field of a dataclass)."""
    batch = _fields_of(batch)
    if isinstance(batch, (tuple, list)) and len(batch) >= 2 and isinstance(batch[1], Tensor):
        return batch[1]
    if isinstance(batch, Mapping):
        for key in TARGET_KEYS:
            if key in batch and isinstance(batch[key], Tensor):
                return batch[key]
        raise BatchNotUnderstood(
            f"Expected a dict batch to hold the target under one of {list(TARGET_KEYS)}, but its keys are "
            f"{list(batch)}. Pass `targets=lambda batch: batch[...]` to say where the labels are."
        )
    raise BatchNotUnderstood(
        f"Expected the batch to be a tuple `(x, y, ...)` with a tensor target second, but got "
        f"{_describe(batch)}. Pass `targets=lambda batch: ...` to say where the labels are."
    )


def default_forward(module: nn.Module, inputs: Inputs) -> Any:
    """``module(x)``, ``module(*x)`` for a tuple, ``module(**x)`` for a dict."""
    if isinstance(inputs, Mapping):
        return module(**inputs)
    if isinstance(inputs, (tuple, list)):
        return module(*inputs)
    return module(inputs)


def select_output(outputs: Any) -> Tensor:
    """The tensor of predictions in what a model returned: the tensor itself, ``logits`` of a dict, or
    the first floating tensor of a tuple/dict."""
    if isinstance(outputs, Tensor):
        return outputs
    if isinstance(outputs, Mapping):
        for key in OUTPUT_KEYS:
            if isinstance(outputs.get(key), Tensor):
                return outputs[key]
        candidates = list(outputs.values())
    elif isinstance(outputs, (tuple, list)):
        candidates = list(outputs)
    else:
        candidates = [getattr(outputs, key, None) for key in OUTPUT_KEYS]
    for item in candidates:
        if isinstance(item, Tensor) and item.is_floating_point():
            return item
    raise BatchNotUnderstood(
        f"Expected the model to return a tensor, or a tuple/dict holding one, but got {_describe(outputs)}. "
        "Pass `forward=lambda module, x: ...` returning the prediction tensor."
    )


def batch_size_of(inputs: Inputs) -> int:
    """Size of the first dimension of the first tensor in ``inputs``."""
    tensor = first_tensor(inputs)
    if tensor is None or tensor.ndim == 0:
        raise BatchNotUnderstood(
            f"Expected the model input to contain a tensor with a batch dimension, but got {_describe(inputs)}. "
            "Pass `inputs=lambda batch: ...` returning the tensor(s) the model takes."
        )
    return int(tensor.shape[0])


@dataclass(frozen=True)
class BatchAdapter:
    """The three user-overridable pieces of batch understanding, bundled."""

    inputs: InputsFn = default_inputs
    targets: TargetsFn = default_targets
    forward: ForwardFn = default_forward

    @classmethod
    def build(
        cls, inputs: InputsFn | None = None, targets: TargetsFn | None = None, forward: ForwardFn | None = None
    ) -> BatchAdapter:
        for name, fn in (("inputs", inputs), ("targets", targets), ("forward", forward)):
            if fn is not None and not callable(fn):
                raise TypeError(f"Expected `{name}` to be a callable, but got {fn!r}.")
        return cls(inputs or default_inputs, targets or default_targets, forward or default_forward)

    def get_inputs(self, batch: Any) -> Inputs:
        return self.inputs(batch)

    def get_targets(self, batch: Any) -> Tensor:
        targets = self.targets(batch)
        if not isinstance(targets, Tensor):
            raise BatchNotUnderstood(
                f"Expected `targets` to return a tensor, but got {_describe(targets)}. "
                "Pass `targets=lambda batch: ...` returning the label tensor."
            )
        return targets

    def predict(self, module: nn.Module, inputs: Inputs) -> Tensor:
        return select_output(self.forward(module, inputs))

    def fitted(self, module: nn.Module, batch: Any) -> BatchAdapter:
        """This adapter if the model can be called with it on ``batch``; else, when ``inputs=`` and
        ``forward=`` were left to their defaults, one that hands the model the whole batch (``module(batch)``,
        as a ``forward(self, batch)`` wants), or, for a module without ``forward`` that wraps one model, one that
        calls that model (:class:`ChildForward`). Raises :class:`BatchNotUnderstood` naming the arguments to pass
        when neither works. Runs the model once or twice: call it under ``torch.no_grad()`` on a snapshot."""
        guessed = self._guessed
        first: Exception | None = None
        inputs = None
        try:
            inputs = self.get_inputs(batch)
            if not guessed or self._predicts_each_example(self.predict(module, inputs), batch):
                return self
        except Exception as error:  # noqa: BLE001 - the user's forward on what we guessed it takes
            first = error
        if guessed:
            for other in self._other_readings(module, batch, first):
                if other._runs_on(module, batch):
                    return other
        if first is None:
            return self  # odd outputs from the default call, and no better reading: leave it to the check
        self._raise_not_understood(first, inputs, batch)

    @property
    def _guessed(self) -> bool:
        """Whether ``inputs=`` and ``forward=`` were left to their defaults, so the reading is ours to change."""
        return self.inputs is default_inputs and self.forward is default_forward

    def _other_readings(self, module: nn.Module, batch: Any, first: Exception | None) -> Iterator[BatchAdapter]:
        """The readings of ``batch`` to try when the default one failed (``first`` is its error) or returned no
        prediction per example, most specific first; each is built only when the one before it did not fit."""
        by_name = self._by_signature(module, batch)
        if by_name is not None:
            # `forward(self, x, adj)` fed from `(x, adj, y, ...)`, or `forward(self, x, adj)` from a dict
            # with those keys: the batch entries the signature names are the inputs
            yield by_name
        if not isinstance(batch, Tensor):
            yield replace(self, inputs=whole_batch, forward=call_with_batch)
        child = _sole_model(module) if isinstance(first, NotImplementedError) else None
        if child is not None:
            # a LightningModule without `forward` that wraps one model (`self.model(**batch)` in training_step,
            # as Hugging Face users write it): call that model, with the whole dict batch first (attention
            # masks included), then with the input alone
            if isinstance(batch, Mapping):
                yield replace(self, inputs=whole_batch, forward=ChildForward(child, whole=True))
            yield replace(self, forward=ChildForward(child, whole=False))

    def _runs_on(self, module: nn.Module, batch: Any) -> bool:
        """Whether the model, called through this adapter on ``batch``, returns a prediction per example."""
        try:
            return self._predicts_each_example(self.predict(module, self.get_inputs(batch)), batch)
        except Exception:  # noqa: BLE001 - the first error is the one worth reporting
            return False

    def _raise_not_understood(self, first: Exception, inputs: Inputs, batch: Any) -> NoReturn:
        """Raise what the default reading of ``batch`` met, naming the arguments that would tell us more."""
        if isinstance(first, BatchNotUnderstood):
            raise first
        guessed = self._guessed
        tried = f"`module(x)` with x = {_describe(inputs)}" if guessed else "your `inputs=` / `forward=`"
        also = " and `module(batch)` with the whole batch" if guessed and not isinstance(batch, Tensor) else ""
        raise BatchNotUnderstood(
            f"calling the model as {tried}{also} raised {type(first).__name__}: {first}. Pass "
            "`inputs=lambda batch: ...` returning what `forward` takes, or `forward=lambda module, x: ...`."
        ) from first

    def _by_signature(self, module: nn.Module, batch: Any) -> BatchAdapter | None:
        """An adapter whose inputs are the batch entries ``module.forward``'s signature asks for: the first
        ``k`` items of a tuple batch for ``k`` required positional parameters (the target is then item
        ``k``, unless ``targets=`` was given), or the keys of a dict batch that name parameters. ``None``
        when the signature does not say more than ``module(x)`` already tried."""
        try:
            params = list(inspect.signature(module.forward).parameters.values())
        except (TypeError, ValueError):
            return None
        positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        required = [p for p in positional if p.default is p.empty]
        if isinstance(batch, (tuple, list)) and not hasattr(batch, "_fields"):
            k = len(required)
            if k < 2 or k >= len(batch) or not all(isinstance(v, Tensor) for v in batch[: k + 1]):
                return None
            targets = self.targets if self.targets is not default_targets else _ItemAt(k)
            return replace(self, inputs=_LeadingItems(k), targets=targets)
        if isinstance(batch, Mapping):
            named = tuple(p.name for p in params if p.name in batch and p.kind is not p.POSITIONAL_ONLY)
            if not named or any(p.name not in named for p in required if p.kind is not p.POSITIONAL_ONLY):
                return None
            return replace(self, inputs=_Keys(named))
        return None

    def _predicts_each_example(self, output: Tensor, batch: Any) -> bool:
        """Whether ``output`` can hold one prediction per example: a dimension of the targets' batch size,
        or flattened rows (``(N*T, ...)``). A forward that took a guessed input and still ran can return
        something else (``batch[0]`` of a tensor is its first row)."""
        try:
            n = self.get_targets(batch).shape[0]
        except (BatchNotUnderstood, IndexError):
            return True  # no targets to compare with
        return n in output.shape or (output.ndim >= 1 and output.shape[0] >= n and output.shape[0] % n == 0)


def _sole_model(module: nn.Module) -> str | None:
    """The name of the one direct submodule with parameters (``self.model``), if there is exactly one."""
    named = [name for name, child in module.named_children() if next(child.parameters(), None) is not None]
    return named[0] if len(named) == 1 else None


@dataclass(frozen=True)
class ChildForward:
    """``forward=`` that calls the submodule ``name`` of the module: ``model(**batch)`` with ``whole``, else
    :func:`default_forward` on it. Picklable, and it follows the module to any device or process."""

    name: str
    whole: bool = False

    def __call__(self, module: nn.Module, inputs: Inputs) -> Any:
        child = getattr(module, self.name)
        if self.whole and isinstance(inputs, Mapping):
            return child(**inputs)
        return default_forward(child, inputs)


@dataclass(frozen=True)
class _LeadingItems:
    """``inputs=`` taking the first ``count`` items of a tuple batch (a multi-input ``forward``)."""

    count: int

    def __call__(self, batch: Any) -> tuple[Any, ...]:
        return tuple(batch[: self.count])


@dataclass(frozen=True)
class _ItemAt:
    """``targets=`` taking item ``index`` of a tuple batch (the item after the inputs)."""

    index: int

    def __call__(self, batch: Any) -> Any:
        return batch[self.index]


@dataclass(frozen=True)
class _Keys:
    """``inputs=`` taking the entries of a dict batch that ``forward`` names as parameters."""

    keys: tuple[str, ...]

    def __call__(self, batch: Any) -> dict[str, Any]:
        return {key: batch[key] for key in self.keys}


def whole_batch(batch: Any) -> Any:
    """``inputs=`` for models whose ``forward`` takes the whole batch."""
    return batch


def call_with_batch(module: nn.Module, batch: Any) -> Any:
    """``forward=`` for models whose ``forward`` takes the whole batch as one argument."""
    return module(batch)


def _describe(value: Any) -> str:
    if isinstance(value, Tensor):
        kind = "a sparse tensor" if is_sparse(value) else "a tensor"
        return f"{kind} of shape {tuple(value.shape)}"
    if isinstance(value, Mapping):
        return f"a dict with keys {list(value)}"
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of {len(value)} ({', '.join(type(v).__name__ for v in value)})"
    return type(value).__name__
