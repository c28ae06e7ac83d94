"""What a check returns, and how a control is named.

A check is an async function `run(ctx) -> ControlResult`, one module per control under
`tessera.pci.checks`, registered in `tessera.pci.checks.CHECKS`. It judges on raw output it
also returns (`evidence`, JSON-ready builtins), so the assessor sees what the verdict was based
on, not only the verdict.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class Status(StrEnum):
    PASSED = "pass"
    FAILED = "fail"
    #: The check could not be made (a peer unreachable, a tool missing): never a pass.
    NOT_CHECKED = "not_checked"


@dataclass(frozen=True)
class Control:
    """One evidence check: its id (`audit-log`), title and the PCI DSS requirements it covers."""

    id: str
    title: str
    requirements: tuple[str, ...]

    def passed(self, summary: str, evidence: Any = None) -> ControlResult:
        return ControlResult(self, Status.PASSED, summary, evidence)

    def failed(self, summary: str, evidence: Any = None) -> ControlResult:
        return ControlResult(self, Status.FAILED, summary, evidence)

    def not_checked(self, reason: str, evidence: Any = None) -> ControlResult:
        return ControlResult(self, Status.NOT_CHECKED, reason, evidence)

    def judged(self, failures: list[str], summary: str, evidence: Any = None) -> ControlResult:
        """Fail with the failures (one line each) if there are any, else pass with `summary`."""
        if failures:
            return self.failed("; ".join(failures), evidence)
        return self.passed(summary, evidence)


@dataclass(frozen=True)
class ControlResult:
    control: Control
    status: Status
    #: One or a few sentences: why it passed, what failed, or why it was not checked.
    summary: str
    #: The raw output the verdict was judged on (JSON-ready builtins; never a card number).
    evidence: Any = None
    #: Sub-results ("chain 3 verified", "role tessera_vault: UPDATE on audit_log") when useful.
    details: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "control": self.control.id,
            "title": self.control.title,
            "requirements": list(self.control.requirements),
            "status": str(self.status),
            "summary": self.summary,
            "details": self.details,
            "seconds": round(self.seconds, 3),
            "evidence": self.evidence,
        }
