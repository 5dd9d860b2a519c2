"""What every lightning_recipe callback has: a name, the component its TensorBoard tags live under, and the way a
component that cannot read the user's data twice waits for the first batch training fetches."""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence

from lightning.pytorch.callbacks import Callback

from lightning_recipe import _logging

__all__ = ["RecipeCallback", "format_names", "snake_case"]


@functools.cache  # tags are built on every logging step: keep the regex off that path
def snake_case(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def format_names(names: Sequence[str], limit: int = 5) -> str:
    """``a, b, c, d, e and 4 more``: the names in a message, the first ``limit`` of them."""
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


class RecipeCallback(Callback):
    """Base of checks and monitors: ``name`` is the class name, tags are ``recipe/<component>/<quantity>``."""

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
