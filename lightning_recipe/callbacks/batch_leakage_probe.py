"""BatchLeakageProbe: "use backprop to chart dependencies" (Karpathy's recipe).

Set the loss to the outputs of one example and backpropagate: only that example's input may receive a
gradient. Anything else is a bug that mixes information across the batch (``view`` instead of
``permute``, statistics or softmax over dim 0, a ``batch_first=False`` layer fed batch-first tensors).
With a time dimension the same trick checks causality: the output at ``t`` may depend on inputs at
``<= t`` only. The math lives in :mod:`lightning_recipe.diagnostics.leakage`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from typing_extensions import Unpack, override

from lightning_recipe import _logging
from lightning_recipe._args import check_choice, check_fraction, check_int
from lightning_recipe.callbacks._context import CheckContext
from lightning_recipe.callbacks._errors import CheckSkipped
from lightning_recipe.callbacks._preflight import CheckOptions, PreflightCheck
from lightning_recipe.diagnostics.batch import BatchNotUnderstood
from lightning_recipe.diagnostics.leakage import (
    LeakageNotApplicable,
    LeakageReport,
    LeakCause,
    ProbeSettings,
    probe_batch_leakage,
)
from lightning_recipe.report import CheckResult

__all__ = ["BatchLeakageProbe"]

_MAX_LISTED = 64


def _check_optional_dim(name: str, value: Any) -> None:
    if value is not None:
        check_int(name, value, 0)


class BatchLeakageProbe(PreflightCheck):
    """Fails when an example's output depends on another example's input, or (for sequence models) when
    the output at position ``t`` depends on inputs after ``t``.

    Runs once before the first optimizer step, on the first training batch, in eval mode (BatchNorm then
    uses its running statistics and is per example, so it is never reported; dropout is off). All
    ``B * (B - 1)`` pairs of ``B`` probed examples are covered in ``2 * ceil(log2 B)`` backward passes;
    a few more name the exact pairs and the layer where mixing starts when a leak shows up.

    Args:
        batch_dim: batch dimension of the inputs. Default: found (dim 0, or dim 1 for ``(T, N, ...)``
            sequences, checked against the targets and the gradient structure).
        output_batch_dim: batch dimension of the model output. Default: found; flattened ``(N*T, ...)``
            outputs are mapped back to examples.
        causal: check causality. ``None`` (default): when ``time_dim`` is given or the model is trained on
            next-token targets, whether the shift is in the batch (the targets are the inputs shifted by one
            position) or inside the model's own loss (``labels = input_ids``, as Hugging Face and litgpt models
            shift; read from the gradient of your loss); a model trained on other targets is not held to
            causality unless asked.
        time_dim: time dimension of the inputs as the model takes them (default: the first non-batch dim).
        num_examples: examples of the batch to probe (at least 2). Eval mode makes a healthy model's
            outputs independent of the batch size, so a few are enough.
        tolerance: relative gradient (to the largest on the same tensor in the same pass) above which an
            example or position counts as a dependency.
        graph: whether the examples are the nodes of one graph (full-batch node classification: an
            ``(N, N)`` adjacency, sparse or dense, among the inputs). ``None`` (default): found; a node is then
            held to the neighbourhood the adjacency products in ``forward`` reach, not to independence.
            ``False``: probe the nodes as independent examples (on the subgraph of the first
            ``num_examples`` nodes).
        on_fail, inputs, targets, forward: see :class:`~lightning_recipe.callbacks._preflight.PreflightCheck`.

    Example::

        trainer = L.Trainer(callbacks=[BatchLeakageProbe()])
        trainer.fit(model, datamodule)  # RecipeCheckError names the leaking pairs and the fix

    Logged (scalars at step 0): ``recipe/batch_leakage_probe/leaking_pairs``, ``.../causal_violations``,
    ``.../backward_passes``; image ``.../dependency_matrix`` (white: output row depends on input column).
    """

    def __init__(
        self,
        *,
        batch_dim: int | None = None,
        output_batch_dim: int | None = None,
        causal: bool | None = None,
        time_dim: int | None = None,
        num_examples: int = 16,
        tolerance: float = 1e-5,
        graph: bool | None = None,
        **options: Unpack[CheckOptions],
    ) -> None:
        super().__init__(**options)
        _check_optional_dim("batch_dim", batch_dim)
        _check_optional_dim("output_batch_dim", output_batch_dim)
        _check_optional_dim("time_dim", time_dim)
        check_choice("causal", causal, (None, True, False))
        check_choice("graph", graph, (None, True, False))
        check_int("num_examples", num_examples, 2)
        check_fraction("tolerance", tolerance)
        if time_dim is not None and batch_dim is not None and time_dim == batch_dim:
            raise ValueError(f"Expected `time_dim` and `batch_dim` to differ, but both are {time_dim}.")
        self.settings = ProbeSettings(
            batch_dim=batch_dim,
            output_batch_dim=output_batch_dim,
            causal=causal,
            time_dim=time_dim,
            num_examples=num_examples,
            tolerance=tolerance,
            graph=graph,
        )

    @override
    def run(self, ctx: CheckContext) -> CheckResult:
        batch = ctx.batches[0]
        inputs = ctx.adapter.get_inputs(batch)
        try:
            targets: torch.Tensor | None = ctx.adapter.get_targets(batch)
        except BatchNotUnderstood:
            targets = None

        def forward(module: Any, x: Any) -> torch.Tensor:
            with ctx.autocast():
                return ctx.adapter.predict(module, x)

        next_token = None
        if self.settings.causal is None and self.settings.time_dim is None:
            alignment = ctx.alignment(batch)
            if alignment is not None and alignment.next_token:
                next_token = f"next-token training: {alignment.describe()}"
        try:
            report = probe_batch_leakage(
                ctx.module, inputs, forward, targets=targets, settings=self.settings, next_token=next_token
            )
        except LeakageNotApplicable as reason:
            raise CheckSkipped(str(reason)) from None
        self._log(ctx, report)
        return self._verdict(report)

    # -- verdict and words -----------------------------------------------------------------------
    def _verdict(self, r: LeakageReport) -> CheckResult:
        details = _details(r)
        b = r.num_examples
        passes = r.total_backward_passes
        if r.graph is not None:
            return self._graph_verdict(r, details)
        if r.batch_leak:
            i, j = r.leaking_pairs[0]
            where = _where(r)
            summary = (
                f"examples mix through the batch: {len(r.leaking_pairs)} of {b * (b - 1)} (output, input) "
                f"example pairs depend on each other{'' if r.pairs_exact else ' (candidates)'}, e.g. the output "
                f"of example {i} depends on the input of example {j}; expected none. Probed {b} examples "
                f"in eval mode with {passes} backward passes{where}."
            )
            return self.failed(summary, _HINTS[r.cause](r), details)
        if r.causal_leak:
            summary = (
                f"outputs see the future: {_violation_text(r)}; expected the output at position t to depend "
                f"on input positions <= t only. Checked {len(r.cuts_checked)} cuts of a sequence of "
                f"{r.sequence_length} positions in eval mode ({r.causal_reason})."
            )
            return self.failed(summary, _HINTS[r.cause](r), details)
        summary = (
            f"no output depends on another example's input: all {b * (b - 1)} pairs of {b} examples checked "
            f"with {passes} backward passes in eval mode (BatchNorm uses running statistics, dropout off)"
        )
        if r.causal_checked:
            summary += (
                f"; causal: each output position t depends on input positions <= t only "
                f"({len(r.cuts_checked)} cuts over {r.sequence_length} positions; {r.causal_reason})."
            )
        else:
            summary += f"; causality not checked: {r.causal_reason}."
        if r.probed_layer is not None:
            summary += f" Probed at the {r.output_layout}."
            if self.settings.causal:
                return self.skipped(
                    f"{self.name} checked the batch ({summary}) but could not check causality as asked. Pass "
                    "`time_dim=` (the time dimension of the inputs) or `forward=` returning per-position outputs.",
                    details,
                )
        return self.passed(summary, details)

    def _graph_verdict(self, r: LeakageReport, details: dict[str, Any]) -> CheckResult:
        """Nodes of one graph: held to the neighbourhood the model's propagations reach."""
        g = r.graph
        assert g is not None
        seen = (
            f"the examples are the {g.num_nodes} nodes of one graph (adjacency: {g.adjacency}; `forward` "
            f"propagates through it {g.hops} time{'s' if g.hops != 1 else ''}), so each node may depend on "
            f"its {g.hops}-hop neighbourhood by design"
        )
        if not r.batch_leak:
            return self.passed(
                f"{seen}; none of {len(g.probed_nodes)} probed nodes depends on a node outside it "
                f"({g.dependencies_within} dependencies inside, {r.total_backward_passes} backward passes in "
                "eval mode). Causality not checked: a graph has no time order.",
                details,
            )
        i, j = r.leaking_pairs[0]
        nodes = {i for i, _ in r.leaking_pairs}
        summary = (
            f"node outputs reach beyond the graph: {len(nodes)} of {len(g.probed_nodes)} probed nodes depend "
            f"on nodes outside their {g.hops}-hop neighbourhood ({len(r.leaking_pairs)} such pairs), e.g. the "
            f"output of node {i} depends on node {j}; {seen}, and nothing further{_where(r)}."
        )
        return self.failed(summary, _HINTS[r.cause](r), details)

    def _log(self, ctx: CheckContext, r: LeakageReport) -> None:
        _logging.log_scalars(
            ctx.trainer,
            {
                ctx.tag("leaking_pairs"): float(len(r.leaking_pairs)),
                ctx.tag("causal_violations"): float(len(r.violating_cuts)),
                ctx.tag("backward_passes"): float(r.total_backward_passes),
            },
            step=0,
        )
        image = r.dependency.clone()
        image.fill_diagonal_(0.5)  # the example itself: expected, not probed
        _logging.log_images(ctx.trainer, ctx.tag("dependency_matrix"), image[None, None], 0)


def _details(r: LeakageReport) -> dict[str, Any]:
    return {
        "eval_mode": True,
        "num_examples": r.num_examples,
        "input_batch_dim": r.input_batch_dim,
        "output_layout": r.output_layout,
        "probed": r.probed,
        "num_leaking_pairs": len(r.leaking_pairs),
        "leaking_pairs": [{"output_example": i, "input_example": j} for i, j in r.leaking_pairs[:_MAX_LISTED]],
        "pairs_exact": r.pairs_exact,
        "first_mixing_module": None
        if r.first_mixing_module is None
        else {"name": r.first_mixing_module[0], "type": r.first_mixing_module[1]},
        "last_clean_module": None
        if r.last_clean_module is None
        else {"name": r.last_clean_module[0], "type": r.last_clean_module[1]},
        "mixing_note": r.mixing_module_note,
        "causal_checked": r.causal_checked,
        "causal_reason": r.causal_reason,
        "sequence_length": r.sequence_length,
        "cuts_checked": len(r.cuts_checked),
        "violating_cuts": r.violating_cuts,
        "causal_violations": [
            {"output_position": t, "input_positions": late} for t, late in r.causal_violations[:_MAX_LISTED]
        ],
        "backward_passes": r.backward_passes,
        "total_backward_passes": r.total_backward_passes,
        "tolerance": r.tolerance,
        "graph": None if r.graph is None else dataclasses.asdict(r.graph),
    }


def _where(r: LeakageReport) -> str:
    if r.first_mixing_module is not None:
        name, kind = r.first_mixing_module
        text = f"; mixing first shows in the output of `{name}` ({kind})"
        if r.last_clean_module is not None:
            text += f", after `{r.last_clean_module[0]}` ({r.last_clean_module[1]}) which is still clean"
        else:
            text += ", the first layer: the mixing is in it or in `forward` code before it"
        return text
    if r.last_clean_module is not None:
        return f"; every layer up to `{r.last_clean_module[0]}` is clean: mixing starts in `forward` code after it"
    return ""


_GENERIC = (
    "Usual causes: `view`/`reshape` used to move the batch axis (use `permute`/`transpose`); statistics "
    "(`x.mean(0)`, `x.std(0)`), normalisation or softmax over dim 0 instead of the feature dim; a layer "
    "with `batch_first=False` (nn.LSTM, nn.GRU, nn.MultiheadAttention, nn.Transformer* default to it) fed "
    "`(N, T, ...)` tensors."
)


def _time_first_hint(r: LeakageReport) -> str:
    assert r.first_mixing_module is not None
    name, kind = r.first_mixing_module
    return (
        f"`{name}` is {kind}: it reads dim 0 as time and dim 1 as the batch. If you feed it `(N, T, ...)`, "
        "construct it with `batch_first=True`; if you move the batch axis before it, use "
        f"`x.permute(1, 0, 2)` / `x.transpose(0, 1)`, never `view`/`reshape`. {_GENERIC}"
    )


_REDUCTION = (
    "Every output depends on every example: something reduces over the batch dimension, e.g. "
    "`x - x.mean(0)`, `x / x.std(0)` or `softmax(..., dim=0)`. Reduce over the feature dims instead "
    "(`softmax(dim=-1)`, `x.mean(dim=-1, keepdim=True)`, nn.LayerNorm), or use nn.BatchNorm*d, "
    "which switches to running statistics in eval mode."
)
_SCRAMBLE = (
    "Each output depends on a few other examples, the pattern of a reshape that scrambles the batch: "
    "use `permute`/`transpose`, not `view`/`reshape`, to move the batch axis "
    "(e.g. `(N, T, F) -> (T, N, F)` is `x.permute(1, 0, 2)`)."
)
_BEYOND_NEIGHBOURHOOD = (
    "Something mixes nodes outside the message passing: a softmax or normalisation over the node "
    "dimension (`log_softmax(x, dim=0)` instead of `dim=1`), statistics over dim 0 (`x - x.mean(0)`, "
    "`x / x.norm(dim=0)`), or a `view`/`reshape` that scrambles the node axis. Reduce over the feature "
    "dim instead. If every node is meant to see the whole graph (a global readout, a virtual node), "
    "this check does not apply: leave BatchLeakageProbe out for this model."
)
_MASK = "`torch.triu(torch.full((T, T), float('-inf')), diagonal=1)`"
_OFF_BY_ONE = (
    "Position t sees only a few positions ahead (t + 1 per attention layer): the causal mask is off by "
    f"one and lets position t see the token it has to predict. The mask must hide positions j > t: {_MASK} "
    "(diagonal=1, not 2), or `nn.Transformer.generate_square_subsequent_mask(T)`. Also check that the "
    "targets are the inputs shifted by exactly one position."
)
_FUTURE = (
    "Position t sees the whole future: add a causal mask to every attention layer, "
    f"{_MASK} or `nn.Transformer.generate_square_subsequent_mask(T)` (or `is_causal=True` together with "
    "the mask); bidirectional RNNs and convolutions padded on both sides leak the same way (pad on the "
    "left only). If the model is meant to see the whole sequence, pass `causal=False`."
)

#: The hint for each cause the probe reads from its evidence (:attr:`LeakageReport.cause`): the one place that
#: words them.
_HINTS: dict[LeakCause, Callable[[LeakageReport], str]] = {
    LeakCause.TIME_FIRST_LAYER: _time_first_hint,
    LeakCause.BATCH_REDUCTION: lambda r: f"{_REDUCTION} {_GENERIC}",
    LeakCause.BATCH_SCRAMBLE: lambda r: f"{_SCRAMBLE} {_GENERIC}",
    LeakCause.BEYOND_NEIGHBOURHOOD: lambda r: _BEYOND_NEIGHBOURHOOD,
    LeakCause.FUTURE_OFF_BY_ONE: lambda r: _OFF_BY_ONE,
    LeakCause.FUTURE_SEEN: lambda r: _FUTURE,
}


def _violation_text(r: LeakageReport) -> str:
    if r.causal_violations:
        shown = []
        for t, late in r.causal_violations[:3]:
            span = (
                f"{late[0]}"
                if len(late) == 1
                else f"{late[0]}..{late[-1]}"
                if late == list(range(late[0], late[-1] + 1))
                else ", ".join(map(str, late[:6]))
            )
            shown.append(f"output at t={t} depends on input position(s) {span}")
        return "; ".join(shown)
    return f"outputs up to positions {r.violating_cuts[:5]} depend on later inputs"
