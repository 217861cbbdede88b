"""Errors a user can cause, each with a documented exit code.

Anything raised as a `TrainerError` is printed as one clear message (what went
wrong, and the fix) by the CLI, never as a traceback. Any other exception is a
bug in trainer and exits 1 with the traceback.

Exit codes (documented in the README):
  0 ok, 1 bug, 2 bad spec or input, 3 environment, 4 remote store, 130 interrupted
  (SIGTERM / SIGINT outside training, or a second one during training).
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_BUG = 1
EXIT_BAD_INPUT = 2
EXIT_ENVIRONMENT = 3
EXIT_REMOTE = 4
EXIT_INTERRUPTED = 130


class TrainerError(Exception):
    """A problem the user can fix. `fix` says how."""

    exit_code = EXIT_BUG

    def __init__(self, message: str, fix: str | None = None):
        super().__init__(message)
        self.message = message
        self.fix = fix

    def __str__(self) -> str:
        return self.message if not self.fix else f"{self.message}\n  fix: {self.fix}"


class SpecError(TrainerError):
    """The job spec is invalid. Carries every problem found, not just the first."""

    exit_code = EXIT_BAD_INPUT

    def __init__(self, problems: list["SpecProblem"], source: str | None = None):
        self.problems = problems
        self.source = source
        where = f" in {source}" if source else ""
        n = len(problems)
        head = f"{n} problem{'s' if n != 1 else ''}{where}:"
        body = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{head}\n{body}")


class SpecProblem:
    """One problem in a spec: where (a YAML path such as `train.optimizer`), what, and the fix."""

    def __init__(self, path: str, message: str, fix: str | None = None):
        self.path = path or "(top level)"
        self.message = message
        self.fix = fix

    def __str__(self) -> str:
        text = f"{self.path}: {self.message}"
        return f"{text} (fix: {self.fix})" if self.fix else text

    def __repr__(self) -> str:
        return f"SpecProblem({self.path!r}, {self.message!r})"


class InputError(TrainerError):
    """A file or dataset the user pointed at is missing, unreadable or unusable."""

    exit_code = EXIT_BAD_INPUT


class EnvironmentProblem(TrainerError):
    """The machine cannot run this job (no GPU, old driver, no VRAM, no disk)."""

    exit_code = EXIT_ENVIRONMENT


class StorageError(TrainerError):
    """A remote store (Hub, S3) failed: bad credentials, missing bucket, network down."""

    exit_code = EXIT_REMOTE
    # True when the store kept failing transiently (network, timeouts, 5xx) until the retries ran out: it is
    # likely down, and a caller with more to send stops instead of waiting out the retries again.
    gave_up: bool = False


