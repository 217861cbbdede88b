"""SIGTERM / SIGINT during training.

The first signal asks the loop to stop after the current optimizer step: it writes a checkpoint
and returns "stopped early, resumable". A second signal stops at once (`HardStop`); every write
is atomic, so at worst an unfinished `.tmp-` checkpoint folder is left for the next run to remove.
"""

from __future__ import annotations

import logging
import signal
import threading

log = logging.getLogger("trainer.train")


class HardStop(KeyboardInterrupt):
    """A second stop signal: leave now."""

    def __init__(self, signum: int):
        super().__init__(f"stopped at once by a second {signal.Signals(signum).name}")
        self.signum = signum


class StopRequest:
    """Context manager: installs the handlers (main thread only) and records the request."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signum: int | None = None
        self.reason: str | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None or self.reason is not None

    def request(self, reason: str) -> None:
        """Stop after this step for a reason other than a signal (time budget)."""
        self.reason = self.reason or reason

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            self._restore()
            raise HardStop(signum)
        self.signum = signum
        log.warning("%s received: finishing this step, writing a checkpoint, then stopping (send it again to stop at once)",
                    signal.Signals(signum).name)

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def __exit__(self, *exc) -> None:
        self._restore()
