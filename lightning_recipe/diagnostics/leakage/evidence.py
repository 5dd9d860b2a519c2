"""What the leakage probe takes and returns: the caller's settings, the report and the typed parts each stage of
the probe finds, and the reasons it cannot run.

The stages return frozen parts (:class:`BatchDependencies`, :class:`Mixing`, :class:`CausalReading`, and
:class:`GraphReading` for graphs); :func:`assemble_report` puts them into one :class:`LeakageReport`, field by
field, so a field cannot be misspelled or forgotten on one path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from torch import Tensor

__all__ = [
    "BatchDependencies",
    "CausalPlan",
    "CausalReading",
    "GraphReading",
    "LeakCause",
    "LeakageNotApplicable",
    "LeakageReport",
    "Mixing",
    "NoGradient",
    "NoGradientPath",
    "NoNodeFeatures",
    "ProbeSettings",
    "assemble_report",
]


class LeakageNotApplicable(ValueError):
    """The probe cannot run on this model/batch; the message says why and which argument helps."""


class NoGradientPath(LeakageNotApplicable):
    """No floating-point input and no embedding output to read a gradient at."""


class NoNodeFeatures(NoGradientPath):
    """The nodes of a graph have no floating-point input to read a gradient at. Unlike an example's integer
    inputs, integer node inputs are not probed again as floats."""


class NoGradient(LeakageNotApplicable):
    """There are inputs to read at, but no gradient reaches them from the outputs probed (detached or constant
    outputs, a zero-initialised final layer): another reading of the output may still pass one."""


class LeakCause(str, Enum):
    """The likely cause of what the probe saw, read from the evidence (:attr:`LeakageReport.cause`); the
    callback words each one, and a new cause is a new member here and a new row in its table."""

    NONE = "none"
    """No output depends on what it should not."""
    TIME_FIRST_LAYER = "time_first_layer"
    """Mixing starts at a layer constructed with ``batch_first=False``: it reads dim 0 as time."""
    BATCH_REDUCTION = "batch_reduction"
    """Every output depends on every example: a reduction over the batch dimension."""
    BATCH_SCRAMBLE = "batch_scramble"
    """Each output depends on a few other examples: a reshape that scrambles the batch."""
    BEYOND_NEIGHBOURHOOD = "beyond_neighbourhood"
    """Nodes of a graph depend on nodes outside the neighbourhood the message passing reaches."""
    FUTURE_SEEN = "future_seen"
    """The earliest violating position sees the whole future: no causal mask."""
    FUTURE_OFF_BY_ONE = "future_off_by_one"
    """The earliest violating position sees only a few positions ahead: a causal mask off by one."""


@dataclass(frozen=True)
class ProbeSettings:
    """How to probe: what :func:`~lightning_recipe.diagnostics.leakage.probe_batch_leakage` takes, and what
    :class:`~lightning_recipe.BatchLeakageProbe` holds.

    Attributes:
        batch_dim: batch dimension of the inputs (``None``: found).
        output_batch_dim: batch dimension of the output (``None``: found; flattened ``(N*T, ...)`` outputs are
            mapped back).
        causal: check that output ``t`` depends on inputs ``<= t`` only. ``None``: when ``time_dim`` is given,
            the targets are the inputs shifted by one position, or ``next_token`` says so.
        time_dim: time dimension of the inputs, as given to the model (``None``: the first non-batch dim).
        num_examples: how many examples of the batch to probe.
        tolerance: relative gradient below which an example counts as independent.
        max_exact_rows: suspect output examples whose leaking pairs are named with one targeted pass each; the
            pairs of a batch with more suspects are candidates (a superset of the leaks).
        max_causal_passes: causal passes at most (``B`` cuts each); a longer sequence is checked at cuts spread
            over it.
        seed: seed of the fixed random weights the source outputs are multiplied by.
        next_token: how the caller knows the model is trained on next-token targets when the batch does not
            show it (the shift is inside the model's loss); with ``causal=None`` causality is then checked.
        graph: whether the examples are the nodes of one graph (an ``(N, N)`` adjacency among the inputs that
            ``forward`` multiplies node features by). ``None``: found. Then each node is held to the
            neighbourhood the propagations reach, not to independence; ``False`` probes the nodes as
            independent examples (on the subgraph the first ``num_examples`` nodes induce).
    """

    batch_dim: int | None = None
    output_batch_dim: int | None = None
    causal: bool | None = None
    time_dim: int | None = None
    num_examples: int = 16
    tolerance: float = 1e-5
    max_exact_rows: int = 16
    max_causal_passes: int = 4
    seed: int = 0
    next_token: str | None = None
    graph: bool | None = None


@dataclass(frozen=True)
class CausalPlan:
    """Whether causality is to be checked on this batch, and the reason the report gives for it (or against)."""

    wanted: bool
    reason: str


@dataclass(frozen=True)
class BatchDependencies:
    """Which output examples depend on which input examples (the batch passes and the targeted ones).

    Attributes:
        pairs: ``(i, j)``: output of example ``i`` depends on the input of example ``j != i``.
        exact: whether ``pairs`` is exact (``False``: candidates, a superset of the leaks).
        dependency: ``(B, B)`` matrix, 1 where output ``i`` depends on input ``j != i``.
    """

    pairs: list[tuple[int, int]]
    exact: bool
    dependency: Tensor = field(repr=False)


@dataclass(frozen=True)
class Mixing:
    """Where mixing starts among the recorded layer outputs, ``(name, type)`` each, when found, and a note when
    it could not be placed at a layer."""

    first: tuple[str, str] | None = None
    last_clean: tuple[str, str] | None = None
    note: str | None = None
    first_time_first: bool = False  # the first is a layer that reads dim 0 as time (``batch_first=False``)


@dataclass(frozen=True)
class CausalReading:
    """What the causal passes found, or why they did not run (``checked`` false, ``reason`` says why)."""

    checked: bool
    reason: str
    violations: list[tuple[int, list[int]]] = field(default_factory=list)
    violating_cuts: list[int] = field(default_factory=list)
    cuts_checked: list[int] = field(default_factory=list)
    sequence_length: int | None = None


@dataclass(frozen=True)
class GraphReading:
    """How a batch was read as one graph.

    Attributes:
        num_nodes: ``N``, the examples of the batch.
        adjacency: the adjacency input(s), e.g. ``"sparse (120, 120)"``.
        hops: propagations through the adjacency ``forward`` makes: each node may depend on its
            ``hops``-hop neighbourhood (edges followed in both directions).
        probed_nodes: the nodes whose dependencies were charted.
        neighbourhood_sizes: size of each probed node's allowed neighbourhood, itself included.
        dependencies_within: (probed node, other node) dependencies seen inside the neighbourhoods: the
            evidence that the probe saw the message passing at all.
    """

    num_nodes: int
    adjacency: str
    hops: int
    probed_nodes: list[int]
    neighbourhood_sizes: list[int]
    dependencies_within: int


@dataclass(frozen=True)
class LeakageReport:
    """What the probe saw.

    Attributes:
        num_examples: examples probed (``B``).
        input_batch_dim: the batch dimension of the inputs, as given to the model.
        output_layout: how outputs were mapped to examples, e.g. ``"dim 0"`` or ``"flattened (B*T, ...)"``.
        probed: the tensors gradients were read at (inputs, embedding outputs).
        leaking_pairs: ``(i, j)``: output of example ``i`` depends on the input of example ``j != i``.
        pairs_exact: whether ``leaking_pairs`` is exact (``False``: candidates, a superset of the leaks).
        first_mixing_module / last_clean_module: where mixing starts, ``(name, type)``, when found.
        causal_checked / causal_reason: whether causality was checked, and why (or why not).
        causal_violations: ``(t, [t', ...])``: output at position ``t`` depends on inputs at ``t' > t``.
        violating_cuts: cuts ``c`` for which some output ``<= c`` depends on an input ``> c``.
        cuts_checked: the cuts ``c`` that were checked.
        backward_passes: every backward pass run, by purpose.
        dependency: ``(B, B)`` matrix, 1 where output ``i`` depends on input ``j != i``; diagonal not probed.
        graph: set when the examples are the nodes of one graph: what was read, and the allowed neighbourhood
            the dependencies were held to (``leaking_pairs`` then lists nodes outside it, by node index).
        probed_layer: the layer whose outputs were probed in place of the model's when no gradient reaches the
            inputs from the model's output (a zero-initialised final layer); ``None`` when the model's were.
        first_mixing_time_first: whether ``first_mixing_module`` reads dim 0 as time (constructed with
            ``batch_first=False``).
    """

    num_examples: int
    input_batch_dim: int
    output_layout: str
    probed: list[str]
    leaking_pairs: list[tuple[int, int]]
    pairs_exact: bool
    first_mixing_module: tuple[str, str] | None
    last_clean_module: tuple[str, str] | None
    mixing_module_note: str | None
    causal_checked: bool
    causal_reason: str
    causal_violations: list[tuple[int, list[int]]]
    violating_cuts: list[int]
    cuts_checked: list[int]
    sequence_length: int | None
    backward_passes: dict[str, int]
    tolerance: float
    dependency: Tensor = field(repr=False)
    graph: GraphReading | None = None
    probed_layer: str | None = None
    first_mixing_time_first: bool = False

    @property
    def batch_leak(self) -> bool:
        return bool(self.leaking_pairs)

    @property
    def causal_leak(self) -> bool:
        return bool(self.violating_cuts)

    @property
    def total_backward_passes(self) -> int:
        return sum(self.backward_passes.values())

    @property
    def cause(self) -> LeakCause:
        """The likely cause: a batch leak before a causal one, as the causal passes wait for independent
        examples."""
        if self.batch_leak:
            b = self.num_examples
            if self.graph is not None:
                return LeakCause.BEYOND_NEIGHBOURHOOD
            if self.first_mixing_time_first:
                return LeakCause.TIME_FIRST_LAYER
            return LeakCause.BATCH_REDUCTION if len(self.leaking_pairs) == b * (b - 1) else LeakCause.BATCH_SCRAMBLE
        if self.causal_leak:
            # a missing mask lets the earliest position see the whole future; a mask off by one lets t see t + 1
            # (t + k after k layers), so the earliest violating position still stops short of the end
            last = (self.sequence_length or 0) - 1
            if self.causal_violations and max(self.causal_violations[0][1]) < last:
                return LeakCause.FUTURE_OFF_BY_ONE
            return LeakCause.FUTURE_SEEN
        return LeakCause.NONE


def assemble_report(
    *,
    num_examples: int,
    input_batch_dim: int,
    output_layout: str,
    probed: list[str],
    dependencies: BatchDependencies,
    mixing: Mixing,
    causal: CausalReading,
    backward_passes: dict[str, int],
    tolerance: float,
    graph: GraphReading | None = None,
) -> LeakageReport:
    """One :class:`LeakageReport` from the parts the stages of the probe found."""
    return LeakageReport(
        num_examples=num_examples,
        input_batch_dim=input_batch_dim,
        output_layout=output_layout,
        probed=probed,
        leaking_pairs=dependencies.pairs,
        pairs_exact=dependencies.exact,
        first_mixing_module=mixing.first,
        last_clean_module=mixing.last_clean,
        mixing_module_note=mixing.note,
        causal_checked=causal.checked,
        causal_reason=causal.reason,
        causal_violations=causal.violations,
        violating_cuts=causal.violating_cuts,
        cuts_checked=causal.cuts_checked,
        sequence_length=causal.sequence_length,
        backward_passes=backward_passes,
        tolerance=tolerance,
        dependency=dependencies.dependency,
        graph=graph,
        first_mixing_time_first=mixing.first_time_first,
    )
