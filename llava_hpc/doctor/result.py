"""A doctor check's outcome: one row of the table."""

from __future__ import annotations

from dataclasses import asdict, dataclass

STATUSES = ("ok", "warning", "error", "skipped")


@dataclass
class CheckResult:
    name: str
    status: str  # ok | warning | error | skipped
    detail: str = ""
    fix: str = ""

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {self.status!r}")


def has_errors(results: list[CheckResult]) -> bool:
    return any(r.status == "error" for r in results)


def as_dicts(results: list[CheckResult]) -> list[dict]:
    return [asdict(r) for r in results]
