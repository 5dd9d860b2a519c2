"""The update-to-weight ratio ``||ΔW|| / ||W||`` per parameter tensor (CS231n: "want ~1e-3"), and the window
statistics that decide when it is out of the healthy band. No Lightning here.

Measuring is two calls around an optimizer step: :func:`copy_weights` copies the parameters (one fused copy, in
at least fp32: fp16/bf16 widened, fp64 kept), :func:`measure` compares the stepped parameters with the copy using
``torch._foreach_*`` ops and returns per-tensor norms. Under sharded parameters (FSDP2 ``DTensor``) each rank holds
a shard: the *squared* norms are summed over the mesh dimensions the tensor is sharded along before the ratio is
taken (:func:`reduce_squared_norms`), so every rank gets the ratio of the full tensor. Every rank must call
:func:`measure` on the same steps with the same parameter list: it runs collectives.

Decisions are pure functions of the measured history: :func:`median_ratio` (over weight matrices, where the
ratio means something: biases start at zero and norm-layer gains at one, their ratios are off-scale by design),
:func:`sustained` (a window, not one step: healthy Adam runs have single steps above 1e-2), :func:`never_moved`.
What the step ran under is read from the optimizer: :func:`is_adaptive`, :func:`start_lr`.
:mod:`~lightning_recipe.diagnostics.update_ratio_cause` combines them with the monitor's thresholds into a cause.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "TARGET_RATIO",
    "UpdateRatios",
    "cancelled_biases",
    "copy_weights",
    "gradient_squared_norms",
    "is_adaptive",
    "local_tensor",
    "loss_diverged",
    "loss_rise",
    "measure",
    "measured_dtype",
    "median_ratio",
    "never_moved",
    "no_gradient",
    "reduce_squared_norms",
    "squared_norms",
    "start_lr",
    "sustained",
]

TARGET_RATIO = 1e-3
"""CS231n's rule of thumb for ``||ΔW|| / ||W||`` per step."""


def _is_dtensor(t: Tensor) -> bool:
    return type(t).__name__ == "DTensor" and hasattr(t, "to_local") and hasattr(t, "device_mesh")


def local_tensor(t: Tensor) -> Tensor:
    """The part of ``t`` this rank holds: the local shard of a ``DTensor``, ``t`` itself otherwise."""
    return t.to_local() if _is_dtensor(t) else t  # type: ignore[attr-defined]


def measured_dtype(dtype: torch.dtype) -> torch.dtype:
    """The precision a tensor's norms are taken in: at least fp32 (fp16/bf16 norms of a few thousand entries
    overflow or round), never narrower than the tensor (an fp64 update 1e-9 of its weight vanishes in fp32)."""
    return torch.promote_types(dtype, torch.float32)


def copy_weights(params: Sequence[Tensor]) -> list[Tensor]:
    """Copies of the (local shards of the) parameters in :func:`measured_dtype`, taken just before an optimizer
    step: what :func:`measure` compares the stepped parameters with."""
    local = [local_tensor(p).detach() for p in params]
    copies = [t if measured_dtype(t.dtype) == t.dtype else t.float() for t in local]  # fp16/bf16: widened copies
    wide = [i for i, (t, c) in enumerate(zip(local, copies, strict=True)) if c is t]
    if wide:
        for i, c in zip(wide, torch._foreach_mul([local[i] for i in wide], 1.0), strict=True):  # one fused copy
            copies[i] = c
    return copies


def reduce_squared_norms(params: Sequence[Tensor], squared: Tensor) -> Tensor:
    """Sum per-shard squared norms over the ranks that hold the other shards.

    ``squared`` is ``(k, len(params))``: k quantities per parameter, squared norms of this rank's local shards.
    For a ``DTensor`` parameter the column is all-reduced (sum) over each mesh dimension it is sharded along
    (not over replicated dimensions: those hold copies). Plain tensors are returned as they are. Parameters that
    share a mesh and placements are reduced in one collective. Every rank must call this with the same
    parameter list, on the same steps.
    """
    groups: dict[tuple[int, tuple[int, ...]], list[int]] = {}
    meshes: dict[int, object] = {}
    for i, p in enumerate(params):
        if not _is_dtensor(p):
            continue
        mesh = p.device_mesh  # type: ignore[attr-defined]
        dims = tuple(d for d, placement in enumerate(p.placements) if placement.is_shard())  # type: ignore[attr-defined]
        if dims:
            meshes[id(mesh)] = mesh
            groups.setdefault((id(mesh), dims), []).append(i)
    if not groups:
        return squared
    import torch.distributed as dist

    squared = squared.clone()
    for (mesh_id, dims), columns in groups.items():
        mesh = meshes[mesh_id]
        index = torch.tensor(columns, device=squared.device)
        part = squared.index_select(1, index).contiguous()
        for d in dims:
            dist.all_reduce(part, op=dist.ReduceOp.SUM, group=mesh.get_group(d))  # type: ignore[attr-defined]
        squared.index_copy_(1, index, part)
    return squared


@dataclass(frozen=True)
class UpdateRatios:
    """One measured optimizer step. Tensors are on the CPU, one entry per parameter, fp32 (fp64 when a parameter
    is fp64).

    Attributes:
        update_norms: ``||W_after - W_before||``.
        weight_norms: ``||W_before||``.
        ratios: ``update_norms / weight_norms`` (``inf`` or ``nan`` where the weight norm is 0).
    """

    update_norms: Tensor
    weight_norms: Tensor
    ratios: Tensor

    @classmethod
    def from_squared(cls, squared: Tensor) -> UpdateRatios:
        """From the ``(2, P)`` squared norms of :func:`squared_norms` (moved to the CPU)."""
        update, weight = squared.sqrt().unbind(0)
        return cls(update_norms=update, weight_norms=weight, ratios=update / weight)

    @property
    def non_finite(self) -> Tensor:
        """Where the weights or the update hold NaN/Inf (their norm is not finite)."""
        return ~(torch.isfinite(self.update_norms) & torch.isfinite(self.weight_norms))


def squared_norms(params: Sequence[Tensor], before: Sequence[Tensor]) -> Tensor:
    """``(2, P)`` squared norms of the updates and of the weights before the step, on the parameters' device,
    summed across shards. No host sync: read them with :meth:`UpdateRatios.from_squared` once they are needed.
    Consumes ``before``: the update is computed in place in the copies (no second copy of the weights)."""
    if not params:
        return torch.zeros(2, 0)
    after = [local_tensor(p).detach() for p in params]
    # not .to(measured_dtype): it costs 1.5 us per tensor even where it has nothing to do
    after = [t if measured_dtype(t.dtype) == t.dtype else t.float() for t in after]
    before = list(before)
    weight = torch.stack(torch._foreach_norm(before))
    torch._foreach_sub_(before, after)  # before - after: the update, negated (its norm is the same)
    update = torch.stack(torch._foreach_norm(before))
    return reduce_squared_norms(params, torch.stack([update, weight]).square())


def gradient_squared_norms(params: Sequence[Tensor]) -> Tensor:
    """``(P,)`` squared norms of the parameters' gradients as they are after the step (0 where there is none),
    summed across shards, on the device, without a host sync. Sparse gradients count through their values."""
    if not params:
        return torch.zeros(0)
    device = local_tensor(params[0]).device
    norms = []
    for p in params:
        g = p.grad
        if g is None:
            norms.append(torch.zeros((), device=device))
            continue
        g = local_tensor(g)
        if g.is_sparse:
            g = g.coalesce().values()
        norms.append(torch.linalg.vector_norm(g.detach(), dtype=measured_dtype(g.dtype)).to(device))
    squared = torch.stack(norms).square()[None]
    return reduce_squared_norms(params, squared)[0]


def no_gradient(gradient_norms: Sequence[float], has_grad: Sequence[bool]) -> bool:
    """Whether an optimizer step carried no gradient at all: every parameter's gradient is missing or zero.
    That is a skipped batch (``training_step`` returned None), and says nothing about the learning rate."""
    return all(not h or g == 0.0 for g, h in zip(gradient_norms, has_grad, strict=True))


#: a bias whose gradient is below this fraction of its layer's weight gradient is cancelled, not starved
CANCELLED_GRADIENT = 1e-4


def cancelled_biases(
    names: Sequence[str],
    update_norms: Sequence[float],
    gradient_norms: Sequence[float],
    has_grad: Sequence[bool],
) -> dict[str, str]:
    """Biases that do not move because a normalisation after their layer cancels them: bias name -> the
    weight of the same layer.

    A bias right before a BatchNorm / LayerNorm is shifted away by the mean subtraction, so its gradient is ~0
    by construction (only rounding remains), and plain SGD then leaves it exactly where it is. The numerical
    signature: it has a gradient (it is in the graph: not detached, not an unused branch), that gradient is
    rounding-sized (not exactly 0, which says the loss does not depend on it) and below ``CANCELLED_GRADIENT``
    of the gradient of ``<layer>.weight``, and that weight moved at this step."""
    index = {name: i for i, name in enumerate(names)}
    found: dict[str, str] = {}
    for i, name in enumerate(names):
        if not name.endswith("bias") or not has_grad[i]:
            continue
        weight = name[: -len("bias")] + "weight"
        j = index.get(weight)
        if j is None or not has_grad[j] or not update_norms[j] > 0:
            continue
        if 0.0 < gradient_norms[i] <= CANCELLED_GRADIENT * gradient_norms[j]:
            found[name] = weight
    return found


def measure(params: Sequence[Tensor], before: Sequence[Tensor]) -> UpdateRatios:
    """Compare the parameters now with their :func:`copy_weights` from before the step; reduces across shards.
    Consumes ``before``. Waits for the device: :func:`squared_norms` is the part that does not."""
    return UpdateRatios.from_squared(squared_norms(params, before).cpu())


def median_ratio(
    ratios: Sequence[float] | Tensor,
    weight_norms: Sequence[float] | Tensor,
    is_matrix: Sequence[bool],
    min_weight_norm: float = 1e-6,
) -> float | None:
    """The median ratio over the weight matrices (``ndim >= 2``) with a usable norm; over all parameters
    with a usable norm when the model has no matrix. Zero updates count (a parameter that did not move is
    measured at ratio 0); non-finite ratios and weights below ``min_weight_norm`` (a bias still near its zero
    init) do not. The lower middle for an even count; ``None`` when nothing qualifies. Plain Python: a few
    dozen numbers are cheaper here than a dozen small tensor ops."""
    r, w = _floats(ratios), _floats(weight_norms)
    usable = [math.isfinite(a) and math.isfinite(b) and b > min_weight_norm for a, b in zip(r, w, strict=True)]
    chosen = [a for a, u, m in zip(r, usable, is_matrix, strict=True) if u and m]
    chosen = chosen or [a for a, u in zip(r, usable, strict=True) if u]
    if not chosen:
        return None
    chosen.sort()
    return chosen[(len(chosen) - 1) // 2]


def _floats(values: Sequence[float] | Tensor) -> list[float]:
    return values.tolist() if isinstance(values, Tensor) else [float(v) for v in values]


def sustained(history: Sequence[float], threshold: float, above: bool, window: int) -> bool:
    """Whether the median of the last ``window`` measured values lies beyond ``threshold`` (above it, or below
    it): more than half the window must be out of band, so one spike never decides."""
    if window < 1 or len(history) < window:
        return False
    recent = sorted(history[-window:])
    middle = recent[(window - 1) // 2] if above else recent[window // 2]  # the stricter middle for even windows
    return middle > threshold if above else middle < threshold


#: a training loss this many times its first value within the first steps is diverging, not a noisy start
DIVERGED_LOSS_RISE = 5.0


def loss_rise(losses: Sequence[float]) -> float:
    """The highest of ``losses`` over the first one (``nan`` with fewer than two, or a first loss <= 0)."""
    if len(losses) < 2 or not losses[0] > 0:
        return math.nan
    finite = [x for x in losses[1:] if math.isfinite(x)]
    if len(finite) < len(losses) - 1:
        return math.inf
    return max(finite) / losses[0]


def loss_diverged(losses: Sequence[float], factor: float = DIVERGED_LOSS_RISE) -> bool:
    """Whether the training loss of the first steps rose to ``factor`` times its first value or became
    non-finite. Large first steps of a tiny model that converges (SGD at 0.1 on a polynomial regression: ratios
    0.1-1.3, loss noisy but at most ~3x its start) are normal; large steps that blow the loss up 10x (Adam at
    0.3 on a small MLP) overshoot."""
    rise = loss_rise(losses)
    return not math.isnan(rise) and rise >= factor


def never_moved(zero_streak: int, window: int) -> bool:
    """A parameter whose update was exactly zero on ``window`` measured steps in a row. One zero step is no
    evidence (a step skipped by the AMP grad scaler, a sparse gradient); a window of them is."""
    return window >= 1 and zero_streak >= window


#: the optimizer state of a running second moment: Adam(W)/NAdam/RAdam, RMSprop, Adagrad, Adamax
_SECOND_MOMENTS = ("exp_avg_sq", "square_avg", "sum", "exp_inf")


def is_adaptive(optimizer: torch.optim.Optimizer) -> bool:
    """Whether the optimizer divides its steps by a running second moment of the gradient (its state says so):
    its steps are then ~lr per entry whatever the gradient, and a large first ratio means a large learning rate."""
    return any(key in state for state in optimizer.state.values() for key in _SECOND_MOMENTS)


def start_lr(group: Mapping[str, Any]) -> float:
    """The learning rate the user asked for: a scheduler keeps it in ``initial_lr`` (warmup schedulers change
    ``lr`` already when they are built)."""
    return float(group.get("initial_lr", group.get("lr", math.nan)))
