"""Charting dependencies with backprop: does the output of one example depend on the input of another
(a batch leak), and does the output at time ``t`` depend on inputs after ``t`` (a causality leak)?

The recipe's trick is to set the loss to the outputs of example ``i`` and look for gradient on the inputs
of any other example. Done naively that is one backward pass per example; here every pair is covered in
``2 * ceil(log2 B)`` passes by grouping:

* **Batch passes.** For each bit ``b`` of the example index, one pass takes as source the outputs of the
  examples whose bit ``b`` is 1, one pass those whose bit is 0. Any two examples ``i != j`` differ in some
  bit, so there is a pass with ``i`` a source and ``j`` not: a dependency of output ``i`` on input ``j``
  shows up as gradient on a non-source example. The source outputs are weighted with fixed random
  numbers, so dependencies cannot cancel (a plain sum of a softmax over the batch has zero gradient).
  Only when a leak shows up, one targeted pass per suspect output example (bounded) names the exact pairs.
* **Layer where the mixing starts.** Forward hooks keep the output of every leaf module; a binary search
  over them in execution order (one pass each, ``O(log M)``) finds the first whose row for example ``i``
  already depends on another example's input.
* **Causal passes.** Once examples are known to be independent, each example can carry its own cut: in one
  pass example ``e`` takes as source its outputs at positions ``<= c_e`` and any gradient at its input
  positions ``> c_e`` is a violation. ``B`` cuts per pass, ``ceil((T - 1) / B)`` passes (bounded; the cuts
  are then spread over the sequence). Targeted passes from single positions name the offending pairs.

* **Graphs.** When the examples are the nodes of one graph (full-batch node classification: an ``(N, N)``
  adjacency, sparse or dense, in the batch or held by the model), a node depends on its neighbours by
  design. The probe counts how often ``forward`` multiplies node features by the adjacency (``k``), and
  holds each of a sample of nodes to its ``k``-hop neighbourhood instead of to independence; a graph it
  cannot read that way (an edge list) is skipped, saying so.

The model runs in eval mode (BatchNorm uses running statistics and is per example; dropout is off), in its
own dtype. Integer token inputs carry no gradient, so they are probed at the output of the ``nn.Embedding``
that reads them. "Non-zero" is relative, per probed tensor: gradient on an example counts when it exceeds
``tolerance`` times the largest gradient on that tensor in the same pass. A per-example model gives exact
zeros there (autograd never routes a gradient between independent rows), so the tolerance only has to sit
above rounding noise of mathematically cancelling operations (~1e-7 in float32) and below real leaks
(a batch mean of ``B`` examples leaks ``1/B``).

Pure: no Lightning here. The module's train/eval modes are restored afterwards; no ``.grad`` is written
(gradients come from :func:`torch.autograd.grad` on probe tensors).

Modules (each imports only those above it):

* :mod:`.evidence`: the settings, the report, its typed parts, and the reasons the probe cannot run.
* :mod:`.passes`: the runner of backward passes, the batch passes, the search for the layer where mixing starts.
* :mod:`.causal`: the causal passes.
* :mod:`.examples`: the probe of independent examples (where the batch is, the traced forward, the readings).
* :mod:`.graph`: the probe of the nodes of one graph.
* :mod:`.probe`: :func:`probe_batch_leakage`, which picks between them.
"""

from lightning_recipe.diagnostics.leakage.evidence import (
    GraphReading,
    LeakageNotApplicable,
    LeakageReport,
    LeakCause,
    ProbeSettings,
)
from lightning_recipe.diagnostics.leakage.probe import probe_batch_leakage

__all__ = ["GraphReading", "LeakCause", "LeakageNotApplicable", "LeakageReport", "ProbeSettings", "probe_batch_leakage"]
