"""The exceptions a component raises inside itself, and where in the user's code an error of theirs was raised."""

from __future__ import annotations

import os
import sys
import traceback

import lightning
import torch

__all__ = ["CheckSkipped", "NoLoss", "UserCodeError", "user_code_location"]


class CheckSkipped(Exception):
    """Raised inside a check when it does not apply; the message becomes the ``skipped`` summary."""


class NoLoss(CheckSkipped):
    """``training_step`` returned no loss (``None``, as Lightning allows to skip a batch)."""


class UserCodeError(Exception):
    """An exception the user's own code raised inside a check (``training_step`` on a training batch, the
    dataloader, ``on_before_batch_transfer``), carried as ``original``. Internal: :class:`PreflightCheck` unwraps
    it into a failed result (sanity run) or raises ``original`` itself out of ``fit`` (normal run), so an error in
    the user's model is never mistaken for one of ours."""

    def __init__(self, original: BaseException, during: str) -> None:
        super().__init__(f"{type(original).__name__}: {original}")
        self.original = original
        self.during = during


# frames inside these packages are not where the user's bug is; the innermost frame outside them is
_NOT_USER_CODE = tuple(
    os.path.dirname(os.path.abspath(path)) + os.sep
    for path in (getattr(m, "__file__", None) for m in (torch, lightning, sys.modules[__name__.split(".")[0]]))
    if path
)


def user_code_location(error: BaseException) -> tuple[str, str] | None:
    """``("file:line", function)`` of the innermost frame of ``error``'s traceback outside lightning_recipe, torch
    and Lightning: where in the user's code it was raised. ``None`` when every frame is in those packages."""
    frames = traceback.extract_tb(error.__traceback__)
    for frame in reversed(frames):
        if not os.path.abspath(frame.filename).startswith(_NOT_USER_CODE):
            return f"{frame.filename}:{frame.lineno}", frame.name
    return None
