"""The causal passes: does the output at position ``t`` depend on inputs after ``t``?

They run once the examples are known to be independent, so each example can carry its own cut: in one pass
example ``e`` takes as source its outputs at positions ``<= c_e``, and any gradient at its input positions
``> c_e`` is a violation. ``B`` cuts per pass, ``ceil((T - 1) / B)`` passes (bounded; the cuts are then
spread over the sequence). Targeted passes from single output positions name the offending pairs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lightning_recipe.diagnostics.leakage.evidence import CausalReading
from lightning_recipe.diagnostics.leakage.passes import Runner

__all__ = ["causal_passes"]


@dataclass(frozen=True)
class _Sequence:
    """Where time is: ``t_dim`` in the batch-first probed tensors, ``o_dim`` in the output (examples first), and
    which probes (by ``id``) have ``length`` positions on it."""

    t_dim: int
    o_dim: int
    length: int
    probes: frozenset[int]


def _sequence(runner: Runner, in_dim: int, time_dim: int | None, reason: str) -> _Sequence | CausalReading:
    """The time axis of the probed inputs and of the output; a reading saying why not when there is none."""
    if time_dim is not None and time_dim == in_dim:
        return CausalReading(checked=False, reason=f"{reason}; but `time_dim` equals the batch dim {in_dim}")
    # time dim in the batch-first layout of the probed tensors
    t_dim = 1 if time_dim is None else (time_dim + 1 if time_dim < in_dim else time_dim)
    lengths = [p.tensor.movedim(p.batch_dim, 0).shape[t_dim] for p in runner.leaves if p.tensor.ndim > t_dim]
    if not lengths:
        return CausalReading(
            checked=False, reason=f"{reason}; but the inputs have no time dimension {t_dim} (pass `time_dim=`)"
        )
    length = lengths[0]
    out = runner.out
    out_dims = [d for d in range(1, out.ndim) if out.shape[d] == length]
    if length < 2 or not out_dims:
        return CausalReading(
            checked=False,
            reason=f"{reason}; but the output of shape "
            f"{tuple(out.shape)} (examples first) has no time dimension of length {length} to match the "
            "inputs' (pass `time_dim=`, or `forward=` returning per-position outputs)",
            sequence_length=length,
        )
    probes = frozenset(
        id(p)
        for p in runner.leaves
        if p.tensor.ndim > t_dim and p.tensor.movedim(p.batch_dim, 0).shape[t_dim] == length
    )
    return _Sequence(t_dim=t_dim, o_dim=1 if 1 in out_dims else out_dims[0], length=length, probes=probes)


def _cuts(length: int, b: int, max_passes: int) -> list[int]:
    """Every cut ``0 .. length - 2``, or when that takes more than ``max_passes`` passes of ``b`` cuts, as many
    spread over the sequence."""
    cuts = list(range(length - 1))
    capacity = b * max_passes
    if len(cuts) > capacity:
        cuts = sorted({round(x) for x in torch.linspace(0, length - 2, capacity).tolist()})
    return cuts


def _cut_pass(runner: Runner, seq: _Sequence, b: int, cuts: list[int], exact: bool, purpose: str) -> list[list[int]]:
    """One pass: example e takes as source its outputs at positions <= cuts[e] (== when exact); returns,
    per cut, the input positions > cut that received gradient."""
    out, length = runner.out, seq.length
    positions = torch.arange(length, device=out.device)
    cut = torch.full((b,), -1, device=out.device, dtype=torch.long)
    cut[: len(cuts)] = torch.tensor(cuts, device=out.device)
    sel = (positions[None, :] == cut[:, None]) if exact else (positions[None, :] <= cut[:, None])
    shape = [b] + [1] * (out.ndim - 1)
    shape[seq.o_dim] = length
    w = runner.weights(out)
    source = (out * w * sel.to(out.dtype).reshape(shape)).sum()
    rel = torch.zeros(b, length, device=out.device)
    for probe, g in zip(runner.leaves, runner.grads(source, purpose), strict=True):
        if g is None or id(probe) not in seq.probes:
            continue
        gb = g.detach().movedim(probe.batch_dim, 0).movedim(seq.t_dim, 1).abs()
        per = gb.reshape(b, length, -1).amax(2).float().to(rel.device)
        scale = per.max()
        if scale > 0 and torch.isfinite(scale):
            rel = torch.maximum(rel, per / scale)
    found = []
    for e, c in enumerate(cuts):
        late = (rel[e] > runner.tolerance) & (positions > c)
        found.append(positions[late].tolist())
    return found


def causal_passes(
    runner: Runner, b: int, in_dim: int, time_dim: int | None, reason: str, max_passes: int
) -> CausalReading:
    """The cuts whose outputs depend on later inputs, ``b`` cuts a pass, and the pairs of the first of them."""
    seq = _sequence(runner, in_dim, time_dim, reason)
    if isinstance(seq, CausalReading):
        return seq
    all_cuts = _cuts(seq.length, b, max_passes)
    violating: list[int] = []
    for start in range(0, len(all_cuts), b):
        chunk = all_cuts[start : start + b]
        for c, late in zip(chunk, _cut_pass(runner, seq, b, chunk, exact=False, purpose="causal"), strict=True):
            if late:
                violating.append(c)
    violations: list[tuple[int, list[int]]] = []
    if violating:
        # name pairs from single output positions: the first violating cuts, up to one pass
        named = violating[:b]
        for t, late in zip(named, _cut_pass(runner, seq, b, named, exact=True, purpose="causal pairs"), strict=True):
            if late:
                violations.append((t, late))
    return CausalReading(
        checked=True,
        reason=reason,
        violations=violations,
        violating_cuts=violating,
        cuts_checked=all_cuts,
        sequence_length=seq.length,
    )
