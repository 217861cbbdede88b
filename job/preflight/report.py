"""The preflight report: rows of (check, status, detail, fix), a rich table, JSON."""

from __future__ import annotations

import datetime as _dt
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from job.errors import EnvironmentProblem, StorageError

Status = Literal["ok", "warn", "fail"]
STATUSES = ("ok", "warn", "fail")
REPORT_VERSION = 1
REMOTE_CHECK = "remote: "  # the prefix of every remote store's row


@dataclass
class CheckRow:
    check: str
    status: Status
    detail: str
    fix: str | None = None
    data: dict[str, Any] = field(default_factory=dict)  # machine-readable numbers (bytes, counts)

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {self.status!r}")


@dataclass
class PreflightReport:
    rows: list[CheckRow] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)
    created: str = field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))

    def add(self, check: str, status: Status, detail: str, fix: str | None = None, **data: Any) -> CheckRow:
        row = CheckRow(check, status, detail, fix, data)
        self.rows.append(row)
        return row

    def row(self, check: str) -> CheckRow | None:
        return next((r for r in self.rows if r.check == check), None)

    @property
    def status(self) -> Status:
        if any(r.status == "fail" for r in self.rows):
            return "fail"
        return "warn" if any(r.status == "warn" for r in self.rows) else "ok"

    @property
    def failures(self) -> list[CheckRow]:
        return [r for r in self.rows if r.status == "fail"]

    @property
    def warnings(self) -> list[CheckRow]:
        return [r for r in self.rows if r.status == "warn"]

    @property
    def ok(self) -> bool:
        return not self.failures

    def raise_if_failed(self) -> None:
        """Raise naming every failed check and its fix: StorageError (exit 4, as when a store fails later in
        the job) when only remote stores failed, else EnvironmentProblem (exit 3)."""
        failures = self.failures
        if not failures:
            return
        n = len(failures)
        lines = [f"preflight found {n} problem{'s' if n != 1 else ''}:"]
        fixes = []
        for r in failures:
            lines.append(f"  - {r.check}: {r.detail}")
            if r.fix:
                fixes.append(f"{r.check}: {r.fix}")
        error = StorageError if all(r.check.startswith(REMOTE_CHECK) for r in failures) else EnvironmentProblem
        raise error("\n".join(lines), "; ".join(fixes) if fixes else None)

    # ---- JSON
    def to_dict(self) -> dict[str, Any]:
        return {"version": REPORT_VERSION, "created": self.created, "status": self.status,
                "rows": [asdict(r) for r in self.rows], "facts": self.facts}

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, default=str)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PreflightReport":
        rows = [CheckRow(r["check"], r["status"], r["detail"], r.get("fix"), r.get("data") or {}) for r in data.get("rows", [])]
        return cls(rows=rows, facts=data.get("facts") or {}, created=data.get("created", ""))

    @classmethod
    def from_json(cls, text: str) -> "PreflightReport":
        return cls.from_dict(json.loads(text))

    def save(self, path: Path) -> None:
        from job.workspace import atomic_write_text

        atomic_write_text(path, self.to_json() + "\n")

    # ---- display
    def table(self):
        from rich.table import Table
        from rich.text import Text

        colour = {"ok": "green", "warn": "yellow", "fail": "bold red"}
        table = Table(title=f"preflight: {self.status}", show_lines=False, expand=False)
        table.add_column("check", style="bold", no_wrap=True)
        table.add_column("status", no_wrap=True)
        table.add_column("detail")
        table.add_column("fix")
        for r in self.rows:
            table.add_row(Text(r.check), Text(r.status, style=colour[r.status]), Text(r.detail), Text(r.fix or ""))
        return table

    def render(self, console=None) -> None:
        if console is None:
            from job.report import console as default_console

            console = default_console
        console.print(self.table())
