"""The vocabulary every check and monitor speaks: results, statuses, reports, errors, warnings."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

__all__ = ["Alert", "CheckResult", "CheckStatus", "RecipeCheckError", "RecipeWarning", "Report"]


class CheckStatus(str, Enum):
    """Verdict of a check. ``"skipped"`` means the check did not apply and is never a failure."""

    PASSED = "passed"
    FAILED = "failed"
    SKIPPED = "skipped"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class CheckResult:
    """What a check saw.

    Attributes:
        name: the check's name, e.g. ``"InitLossCheck"``.
        status: passed, failed or skipped.
        summary: one line, what was measured against what was expected.
        hint: the likely cause and the fix, or ``None`` when there is nothing to fix.
        details: the numbers behind the verdict; JSON-serialisable.
        duration_s: wall time the check took.
    """

    name: str
    status: CheckStatus
    summary: str
    hint: str | None = None
    details: dict[str, Any] = field(default_factory=dict)
    duration_s: float = 0.0

    @property
    def passed(self) -> bool:
        return self.status is not CheckStatus.FAILED

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "status": self.status.value,
            "summary": self.summary,
            "hint": self.hint,
            "details": jsonable(self.details),
            "duration_s": round(self.duration_s, 4),
        }

    def format(self) -> str:
        """The human-readable verdict, as printed to the console."""
        text = f"[lightning_recipe] {self.name}: {self.status.value.upper()}. {self.summary}"
        if self.hint:
            text += f"\n  Fix: {self.hint}"
        return text


class RecipeCheckError(RuntimeError):
    """Raised out of ``trainer.fit`` by a failed check with ``on_fail="raise"``; carries ``.result``."""

    def __init__(self, result: CheckResult) -> None:
        super().__init__(result.format())
        self.result = result

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (self.result,)


class RecipeWarning(UserWarning):
    """A failed check with ``on_fail="warn"``, or a monitor's alert."""


@dataclass(frozen=True)
class Alert:
    """One alert of a monitor: what kind, at which optimizer step, and the message with the fix."""

    kind: str
    step: int
    message: str
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class Report:
    """The results of several checks, e.g. of a sanity run."""

    results: list[CheckResult] = field(default_factory=list)

    @property
    def checked(self) -> bool:
        """Whether any check gave a verdict. A report of skips only (a sanity run of a resumed run, a model no check
        applies to) checked nothing, which is not a pass."""
        return any(r.status is not CheckStatus.SKIPPED for r in self.results)

    @property
    def passed(self) -> bool:
        """Something was checked and no check failed."""
        return self.checked and all(r.passed for r in self.results)

    @property
    def verdict(self) -> str:
        """``"PASSED"``, ``"FAILED"`` (a check failed) or ``"NOTHING CHECKED"`` (every check skipped)."""
        return "PASSED" if self.passed else "FAILED" if self.checked else "NOTHING CHECKED"

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "checked": self.checked, "checks": [r.to_dict() for r in self.results]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def to_markdown(self) -> str:
        lines = [
            f"# lightning_recipe report: {self.verdict}",
            "",
            "| check | status | summary | time (s) |",
            "|---|---|---|---|",
        ]
        for r in self.results:
            summary = r.summary.replace("|", "\\|")
            lines.append(f"| {r.name} | {r.status.value} | {summary} | {r.duration_s:.2f} |")
        hints = [r for r in self.results if r.hint and r.status is CheckStatus.FAILED]
        if hints:
            lines += ["", "## How to fix", ""]
            lines += [f"- **{r.name}**: {r.hint}" for r in hints]
        return "\n".join(lines) + "\n"


def jsonable(value: Any) -> Any:
    """``value`` with tensors, numpy numbers, tuples and non-finite floats made JSON-safe."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, Enum):
        return value.value
    if hasattr(value, "tolist"):  # torch.Tensor, numpy arrays and scalars
        return jsonable(value.tolist())
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return str(value)
