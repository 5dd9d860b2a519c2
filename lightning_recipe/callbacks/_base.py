"""What every lightning_recipe callback has: a name, the component its TensorBoard tags live under, the way a
component that cannot read the user's data twice waits for the first batch training fetches, and the options every
component takes after its own arguments (how to read a batch; for a check, what a failed verdict does)."""

from __future__ import annotations

import functools
import inspect
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypedDict, get_args, get_origin, get_type_hints

from lightning.pytorch.callbacks import Callback
from typing_extensions import Unpack

from lightning_recipe import _logging
from lightning_recipe._args import OnFail
from lightning_recipe.diagnostics.batch import BatchAdapter, ForwardFn, InputsFn, TargetsFn

__all__ = ["DEFAULTS", "BatchOptions", "CheckOptions", "RecipeCallback", "batch_adapter", "format_names", "snake_case"]


class BatchOptions(TypedDict, total=False):
    """How a component reads a batch: ``inputs``, ``targets``, ``forward`` (see
    :class:`~lightning_recipe.callbacks._preflight.PreflightCheck`). A component takes them as
    ``**options: Unpack[BatchOptions]`` (``CheckOptions`` for a check), written out in its signature by
    :meth:`RecipeCallback.__init_subclass__`."""

    inputs: InputsFn | None
    targets: TargetsFn | None
    forward: ForwardFn | None


class CheckOptions(BatchOptions, total=False):
    """A check's options: how to read a batch, and ``on_fail``, what a failed verdict does."""

    on_fail: OnFail


#: the defaults of the options (:class:`CheckOptions`), in the order a signature lists them
DEFAULTS: dict[str, Any] = {"on_fail": "raise", "inputs": None, "targets": None, "forward": None}


def batch_adapter(component: RecipeCallback, options: Mapping[str, Any], taken: Any) -> BatchAdapter:
    """The batch adapter ``options`` (keys of the TypedDict ``taken``) describe; another key is refused, as Python
    refuses a keyword a written-out signature does not take."""
    for key in options.keys() - taken.__annotations__.keys():
        valid = ", ".join(inspect.signature(type(component)).parameters)
        raise TypeError(f"{component.name} got an unexpected keyword argument {key!r}; it takes {valid}.")
    return BatchAdapter.build(options.get("inputs"), options.get("targets"), options.get("forward"))


def _write_out_options(init: Callable[..., None]) -> None:
    """Give ``init``, which takes ``**options: Unpack[...]``, the signature and annotations it would have with
    each option written out (keyword-only, with its type and default): help(), jsonargparse (LightningCLI) and
    RecipeSuite's typed settings read those, and none of them reads ``Unpack``."""
    signature = inspect.signature(init)
    *own, last = signature.parameters.values()
    try:
        unpacked = get_type_hints(init).get(last.name) if last.kind is last.VAR_KEYWORD else None
    except NameError:  # a subclass of the user's, annotated with a name defined later: not one to write out
        return
    if get_origin(unpacked) is Unpack:
        (options,) = get_args(unpacked)
        hints = options.__annotations__
        # annotated as written ('OnFail'), as signatures read in a module with `from __future__ import annotations`
        written = {k: getattr(hints[k], "__forward_arg__", hints[k]) for k in DEFAULTS if k in hints}
        tail = [inspect.Parameter(k, last.KEYWORD_ONLY, default=DEFAULTS[k], annotation=a) for k, a in written.items()]
        init.__signature__ = signature.replace(parameters=[*own, *tail])  # type: ignore[attr-defined]
        init.__annotations__ = {**init.__annotations__, **get_type_hints(options)}


@functools.cache  # tags are built on every logging step: keep the regex off that path
def snake_case(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def format_names(names: Sequence[str], limit: int = 5) -> str:
    """``a, b, c, d, e and 4 more``: the names in a message, the first ``limit`` of them."""
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


class RecipeCallback(Callback):
    """Base of checks and monitors: ``name`` is the class name, tags are ``recipe/<component>/<quantity>``."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "__init__" in cls.__dict__:  # a signature with the options written out, for those that read it
            _write_out_options(cls.__init__)

    @property
    def name(self) -> str:
        return type(self).__name__

    @property
    def component(self) -> str:
        return snake_case(self.name)

    def tag(self, quantity: str) -> str:
        return _logging.tag(self.component, quantity)

    #: why the component waits for the first batch training fetches; ``None`` when it does not
    _waiting: str | None = None

    def wait_for_first_batch(self, reason: str) -> None:
        """Work on a copy of the first batch training fetches instead of reading one now: a second pass over the
        loader could change what training reads (see :mod:`lightning_recipe.callbacks._data`); ``reason`` says
        why, for the report. The component's ``on_train_batch_start`` takes the reason back (once) and reads the
        batch through :func:`~lightning_recipe.callbacks._data.own_copy` where an error becomes its verdict: a
        batch that cannot be copied is not read at all."""
        self._waiting = reason
