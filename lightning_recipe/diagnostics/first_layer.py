"""The first layer of a network: which module it is, its weights as images, how noise-like they look, and
how far they moved from their initialisation.

Recipe item (Karpathy, CS231n): look at the first-layer filters. Trained ones are smooth, diverse edge and
colour detectors; filters that still look like noise late in training mean the network barely learned, and
filters that do not change at all mean the layer is frozen by mistake or gets no gradient.

Pure: modules and tensors in, numbers and frozen dataclasses out; no Lightning.

- :func:`trace_first_layer` watches one forward pass and names the first module with weights whose input is
  *derived from the model input* (a ``TorchFunctionMode`` follows which tensors descend from the input), so
  a head registered before the first conv, or a positional embedding looked up from ``torch.arange``, is
  not mistaken for it.
- :func:`describe_layer` says whether its weights are image-like (``Conv2d`` kernels of at least 2x2;
  ``Linear`` over a flattened ``(N, C, H, W)`` or ``(N, H, W)`` input) and how to view them as
  ``(filters, channels, height, width)``.
- :func:`noise_score`: mean squared difference of neighbouring entries over twice their variance, ~1 for
  i.i.d. noise, towards 0 for smooth filters.
- :func:`filter_images` renders filters for ``add_images``; :func:`moved_from_init` is
  ``||W - W0|| / ||W0||``; :func:`filter_alerts` turns the numbers into alert kinds.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.tensor import DTensor
from torch.overrides import TorchFunctionMode

from lightning_recipe.diagnostics.update_ratio import measured_dtype
from lightning_recipe.diagnostics.walk import tensors_of

__all__ = [
    "LayerTrace",
    "LayerView",
    "StillCause",
    "Thresholds",
    "describe_layer",
    "filter_alerts",
    "filter_images",
    "gathered",
    "layer_weights",
    "looks_random",
    "moved_from_init",
    "noise_score",
    "norm",
    "resolve_layer",
    "spectral_excess",
    "trace_first_layer",
    "weighted_modules",
    "why_not_changing",
]

#: the smallest side of a rendered filter tile, in pixels: 3x3 kernels are scaled up to be seen
MIN_TILE_PIXELS = 24


# -- which module --------------------------------------------------------------------------------


def layer_weights(module: nn.Module) -> list[Tensor]:
    """The module's own weight matrices/kernels: parameters named ``*weight*`` with 2 or more dimensions
    (``Linear``/``Conv``/``Embedding`` ``weight``, ``LSTM`` ``weight_ih_l0``..., attention
    ``in_proj_weight``). Norm layers' 1-D scales and biases are not filters."""
    return [p for n, p in module.named_parameters(recurse=False) if "weight" in n and p.ndim >= 2]


def gathered(weights: list[Tensor]) -> list[Tensor]:
    """Detached full values of ``weights``: sharded ``DTensor`` parameters (FSDP2) are gathered, so every rank
    measures and draws the whole layer, not its shard. That is a collective: every rank must call this at the
    same points, which the visualizer does (it computes on every rank and logs from rank zero)."""
    return [w.full_tensor().detach() if isinstance(w, DTensor) else w.detach() for w in weights]


def weighted_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every submodule (not the model itself) that owns weights in the sense of :func:`layer_weights`, by
    qualified name, in registration order."""
    return {name: m for name, m in model.named_modules() if name and layer_weights(m)}


def resolve_layer(model: nn.Module, name: str) -> nn.Module:
    """The module called ``name``; a ``ValueError`` listing the modules with weights when there is none (or it
    has no weights)."""
    candidates = weighted_modules(model)
    if name in candidates:
        return candidates[name]
    listed = ", ".join(candidates) if candidates else "(none)"
    raise ValueError(
        f"Expected `layer` to name a module of the model, but got {name!r}; modules with weights are: {listed}."
    )


@dataclass(frozen=True)
class LayerTrace:
    """What one forward pass showed.

    Attributes:
        first: the first module with weights (see :func:`weighted_modules`) to run on a tensor derived from
            the model input; when one such module contains another that also ran on it, the innermost.
            ``None`` if none ran on the input.
        ran: every module with weights that ran before the trace stopped, in execution order.
        derived: those of ``ran`` whose input descended from the model input.
        input_shapes: per module that ran, the shape of the first input tensor it received (derived first).
    """

    first: str | None
    ran: tuple[str, ...]
    derived: tuple[str, ...]
    input_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)


class _Stop(Exception):
    """Raised from the first layer's forward hook: the rest of the forward pass is not needed."""


class _Taint(TorchFunctionMode):
    """Marks every tensor computed from a marked tensor. Keeps references so ``id`` values stay unique."""

    def __init__(self, sources: Sequence[Tensor]) -> None:
        super().__init__()
        self.tainted: dict[int, Tensor] = {id(t): t for t in sources}

    def is_tainted(self, tensor: Tensor) -> bool:
        return id(tensor) in self.tainted

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if any(self.is_tainted(t) for t in tensors_of((args, kwargs))):
            for t in tensors_of(out):
                self.tainted[id(t)] = t
        return out


def trace_first_layer(model: nn.Module, run: Callable[[], Any], sources: Sequence[Tensor]) -> LayerTrace:
    """Call ``run()`` (a forward pass of ``model`` on ``sources``) and watch which module with weights first
    receives a tensor derived from ``sources``. The pass stops right after that module's forward. The caller
    sets eval mode, ``no_grad`` and restores random number generators; this function only adds and removes
    hooks. Errors from ``run`` other than the stop are raised when no first layer was seen."""
    candidates = weighted_modules(model)
    mode = _Taint(list(sources))
    ran: list[str] = []
    derived: list[str] = []
    shapes: dict[str, tuple[int, ...]] = {}

    def pre_hook(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, kwargs: Any) -> None:
            found = list(tensors_of((args, kwargs)))
            from_input = [t for t in found if mode.is_tainted(t)]
            ran.append(name)
            if from_input:
                derived.append(name)
            if (from_input or found) and name not in shapes:
                shapes[name] = tuple((from_input or found)[0].shape)

        return hook

    def post_hook(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if derived and derived[0] == name:
                raise _Stop

        return hook

    handles = []
    for name, module in candidates.items():
        handles.append(module.register_forward_pre_hook(pre_hook(name), with_kwargs=True))
        handles.append(module.register_forward_hook(post_hook(name)))
    try:
        with mode:
            run()
    except _Stop:
        pass
    except Exception:
        if not derived:
            raise
    finally:
        for handle in handles:
            handle.remove()
        mode.tainted.clear()
    return LayerTrace(_innermost(derived), tuple(ran), tuple(derived), shapes)


def _innermost(derived: list[str]) -> str | None:
    """The first of ``derived``, or its first descendant that also ran on the input (a custom block owning
    weights runs its pre-hook before its children's)."""
    if not derived:
        return None
    chosen = derived[0]
    for name in derived[1:]:
        if name.startswith(chosen + "."):
            chosen = name
    return chosen


# -- how to look at it ---------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerView:
    """How a layer's weight reads as images.

    Attributes:
        image_like: whether the weight is a stack of 2-D filters worth looking at.
        description: one line naming the layer and its shape, for the log text.
        reason: why not image-like (empty when it is).
        shape: ``(channels, height, width)`` of one filter when image-like.
    """

    image_like: bool
    description: str
    reason: str = ""
    shape: tuple[int, int, int] | None = None

    def filters(self, weight: Tensor) -> Tensor:
        """``weight`` as ``(filters, channels, height, width)``, detached, float."""
        if self.shape is None:
            raise ValueError(f"the layer is not image-like: {self.reason}")
        return weight.detach().float().reshape(-1, *self.shape)


def describe_layer(
    module: nn.Module, layer_input_shape: Sequence[int] | None = None, model_input_shape: Sequence[int] | None = None
) -> LayerView:
    """Whether ``module``'s weight is image-like. ``Conv2d`` kernels of at least 2x2 are; a ``Linear`` is when
    the model input is ``(N, C, H, W)`` or ``(N, H, W)`` and the layer's input is that, flattened
    (``in_features == C*H*W``). Anything else (plain vectors, embeddings, recurrent layers, 1x1 or 1-D
    convolutions) is watched for movement only."""
    kind = type(module).__name__
    weights = layer_weights(module)
    shapes = " + ".join(str(tuple(w.shape)) for w in weights)
    if isinstance(module, nn.Conv2d):
        out_c, in_c, kh, kw = module.weight.shape
        description = f"{kind}({module.in_channels}, {module.out_channels}, kernel {kh}x{kw})"
        if kh < 2 or kw < 2:
            return LayerView(False, description, f"its {kh}x{kw} kernels have no spatial extent to look at")
        return LayerView(True, description, shape=(int(in_c), int(kh), int(kw)))
    if isinstance(module, nn.Linear):
        description = f"Linear({module.in_features}, {module.out_features})"
        image = _image_shape(model_input_shape)
        if (
            image is not None
            and layer_input_shape is not None
            and len(layer_input_shape) >= 1
            and layer_input_shape[-1] == module.in_features == math.prod(image)
        ):
            return LayerView(True, description + f" over {image[0]}x{image[1]}x{image[2]} images", shape=image)
        return LayerView(
            False,
            description,
            "its input is not a flattened image (model input "
            f"{tuple(model_input_shape) if model_input_shape is not None else 'unknown'})",
        )
    return LayerView(False, f"{kind} with weights {shapes}", f"a {kind}'s weights are not spatial filters")


def _image_shape(shape: Sequence[int] | None) -> tuple[int, int, int] | None:
    if shape is None:
        return None
    if len(shape) == 4 and shape[2] >= 2 and shape[3] >= 2:
        return int(shape[1]), int(shape[2]), int(shape[3])
    if len(shape) == 3 and shape[1] >= 4 and shape[2] >= 4:
        return 1, int(shape[1]), int(shape[2])
    return None


def filter_images(filters: Tensor, max_images: int = 64, min_pixels: int = MIN_TILE_PIXELS) -> Tensor:
    """``(filters, channels, h, w)`` as images ``(N, C, H, W)`` in [0, 1] for ``add_images``.

    Filters with 1 or 3 channels are one image each (grayscale or RGB); other channel counts are shown one
    channel per grayscale image, filter by filter. At most ``max_images``. Each image is min-max normalised
    on its own (contrast per filter, as in CS231n's pictures; a constant filter is mid-grey), scaled up by
    an integer factor (nearest neighbour) so its longer side is at least ``min_pixels``, and framed by a
    1-pixel white border: ``add_images`` packs tiles with no gap."""
    filters = filters.detach().float()
    n, c, h, w = filters.shape
    images = filters if c in (1, 3) else filters.reshape(n * c, 1, h, w)
    images = images[:max_images]
    flat = images.flatten(1)
    low = flat.min(dim=1, keepdim=True).values
    span = flat.max(dim=1, keepdim=True).values - low
    normalised = torch.where(span > 0, (flat - low) / span.clamp_min(1e-12), torch.full_like(flat, 0.5))
    images = normalised.reshape(images.shape)
    scale = max(1, math.ceil(min_pixels / max(h, w)))
    if scale > 1:
        images = images.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
    return F.pad(images, (1, 1, 1, 1), value=1.0)


# -- numbers -------------------------------------------------------------------------------------


def noise_score(filters: Tensor) -> float:
    """How noise-like 2-D filters ``(..., h, w)`` are: the mean squared difference of horizontally and
    vertically neighbouring entries, over twice the mean (unbiased) variance of a filter's entries.

    For i.i.d. entries ``E[(a - b)^2] = 2 var``, so noise scores ~1; smooth filters (Gaussian blobs, colour
    ramps) score near 0, edge detectors in between (a 3x3 Sobel: 0.44); alternating patterns above 1.
    ``nan`` when there is nothing to compare (constant filters, a single entry)."""
    slices = filters.detach().double().reshape(-1, filters.shape[-2], filters.shape[-1])
    h, w = slices.shape[-2:]
    if h * w < 2:
        return float("nan")
    pairs = []
    if h > 1:
        pairs.append((slices[:, 1:, :] - slices[:, :-1, :]).pow(2).flatten(1))
    if w > 1:
        pairs.append((slices[:, :, 1:] - slices[:, :, :-1]).pow(2).flatten(1))
    neighbours = torch.cat(pairs, dim=1).mean()
    variance = slices.flatten(1).var(dim=1, unbiased=True).mean()
    if not variance > 0:
        return float("nan")
    return float(neighbours / (2 * variance))


def spectral_excess(weight: Tensor) -> float:
    """The largest singular value of ``weight`` (as a ``(rows, rest)`` matrix) over what an i.i.d. matrix of the
    same shape and entry spread has: ``std * (sqrt(rows) + sqrt(cols))`` (the edge of the Marchenko-Pastur law).
    A freshly initialised layer scores ~1 (a little below for small shapes); learned weights have a few strong
    directions and score well above (a smooth or low-rank filter bank: 2-10). ``nan`` for a constant weight."""
    w = weight.detach().double().reshape(weight.shape[0], -1) if weight.ndim > 1 else weight.detach().double()[None]
    std = float(w.std()) if w.numel() > 1 else 0.0
    if not std > 0:
        return float("nan")
    top = float(torch.linalg.matrix_norm(w - w.mean(), ord=2))
    return top / (std * (math.sqrt(w.shape[0]) + math.sqrt(w.shape[1])))


#: above this spectral excess a weight has structure no random initialisation has
STRUCTURED_SPECTRUM = 1.5


def looks_random(weight: Tensor, score: float | None, noisy_above: float) -> bool:
    """Whether a first layer still looks like its random initialisation: for image-like layers a noise score at
    or above ``noisy_above`` (i.i.d. noise ~1; pretrained filters are smooth, well below); for any layer a
    spectrum like an i.i.d. matrix's (:func:`spectral_excess` below ``STRUCTURED_SPECTRUM``). A layer frozen on
    purpose holds pretrained structure; a frozen random one is the bug."""
    if score is not None and math.isfinite(score):
        return score >= noisy_above
    excess = spectral_excess(weight)
    return not (excess >= STRUCTURED_SPECTRUM)  # nan (constant): not structure either


def moved_from_init(current: Sequence[Tensor], initial: Sequence[Tensor], initial_norm: float | None = None) -> float:
    """``||W - W0|| / ||W0||`` over all the given tensors together (the difference in at least fp32, fp64 kept;
    accumulated in fp64); ``inf`` if ``W0`` is all zero and ``W`` is not, ``0`` if both are. ``initial_norm``:
    ``||W0||`` when the caller keeps it (:func:`norm` of ``initial``), W0 never changes."""
    wide = [measured_dtype(now.dtype) for now in current]
    diff = norm([now.detach().to(d) - then.detach().to(d) for now, then, d in zip(current, initial, wide, strict=True)])
    base = norm(initial) if initial_norm is None else initial_norm
    if base == 0:
        return 0.0 if diff == 0 else math.inf
    return diff / base


def norm(tensors: Sequence[Tensor]) -> float:
    """The Frobenius norm of all ``tensors`` together, accumulated in fp64."""
    squares = [float(torch.linalg.vector_norm(t.detach(), dtype=torch.float64)) ** 2 for t in tensors]
    return math.sqrt(sum(squares))


# -- verdicts ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Thresholds:
    """When the numbers mean trouble.

    Attributes:
        not_changing_after_steps: from this optimizer step on, a layer that moved at most
            ``not_changing_below`` (relative to its init) is not changing.
        not_changing_below: relative movement counted as none (fp noise of a no-op update).
        late_after_steps: from this step on, a noise-like layer that barely moved is ``noisy``; earlier,
            looks mislead (healthy filters can still look noisy after a few hundred steps).
        noisy_above: noise score counted as noise-like (i.i.d. noise scores ~1).
        noisy_moved_below: movement from init counted as "barely moved".
    """

    not_changing_after_steps: int = 100
    not_changing_below: float = 1e-7
    late_after_steps: int = 2000
    noisy_above: float = 0.8
    noisy_moved_below: float = 0.1


def filter_alerts(step: int, moved: float, score: float | None, thresholds: Thresholds) -> list[str]:
    """Alert kinds for optimizer step ``step``: ``"not_changing"`` and/or ``"noisy"``. ``score`` is ``None``
    (or nan) for layers that are not image-like: they are never ``noisy``."""
    kinds = []
    if step >= thresholds.not_changing_after_steps and moved <= thresholds.not_changing_below:
        kinds.append("not_changing")
    elif (
        step >= thresholds.late_after_steps
        and score is not None
        and score >= thresholds.noisy_above  # False for nan
        and moved < thresholds.noisy_moved_below
    ):
        kinds.append("noisy")
    return kinds


@dataclass(frozen=True)
class StillCause:
    """Why a first layer does not move: ``kind`` is ``"frozen"`` (requires_grad=False), ``"not_in_optimizer"``,
    ``"no_gradient"`` (nothing reaches it) or ``"small_updates"`` (then ``lrs``: the learning rates of its
    parameter groups)."""

    kind: Literal["frozen", "not_in_optimizer", "no_gradient", "small_updates"]
    lrs: tuple[float | None, ...] = ()


def why_not_changing(weights: Sequence[Tensor], optimizers: Sequence[torch.optim.Optimizer]) -> StillCause:
    """The first of the reasons a layer with ``weights`` does not move that holds, in the order a user checks."""
    if not any(w.requires_grad for w in weights):
        return StillCause("frozen")
    ids = {id(w) for w in weights}
    groups = [group for optimizer in optimizers for group in optimizer.param_groups]
    if not any(id(p) in ids for group in groups for p in group["params"]):
        return StillCause("not_in_optimizer")
    if all(w.grad is None or not bool(torch.any(w.grad != 0)) for w in weights):
        return StillCause("no_gradient")
    return StillCause("small_updates", tuple(g.get("lr") for g in groups if any(id(p) in ids for p in g["params"])))
