"""What every lightning_recipe callback has: a name, the component its TensorBoard tags live under."""

from __future__ import annotations

import functools
import re

from lightning.pytorch.callbacks import Callback

from lightning_recipe import _logging

__all__ = ["RecipeCallback", "snake_case"]


@functools.cache  # tags are built on every logging step: keep the regex off that path
def snake_case(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


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
