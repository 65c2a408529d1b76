"""Stopping a long run at its next step when asked to (SIGTERM from ``kill``, ``timeout``, SLURM or ``docker
stop``; SIGINT from Ctrl-C), so that what is complete is kept and nothing is left half-written.

A command installs the handlers with ``stop_on_signals()``; the signal only records the request. Every long loop
(sampling steps, TV iterations, training batches) calls ``check()``, which raises ``Interrupted`` at that safe
point; the command then marks its run interrupted and exits with 128 + the signal number (143, 130). A second
Ctrl-C stops at once.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager

_requested: int | None = None


class Interrupted(Exception):
    """A stop was requested by a signal; raised at the next safe point."""

    def __init__(self, signum: int) -> None:
        self.signum = int(signum)
        super().__init__(f"interrupted by {signal.Signals(self.signum).name}")

    @property
    def exit_code(self) -> int:
        """The shell's convention: 128 + the signal number (SIGTERM 143, SIGINT 130)."""
        return 128 + self.signum


def request(signum: int) -> None:
    """Ask the running loops to stop at their next step (what the signal handler does)."""
    global _requested
    _requested = int(signum)


def requested() -> int | None:
    """The signal that asked for a stop, or None."""
    return _requested


def reset() -> None:
    global _requested
    _requested = None


def check() -> None:
    """Raise ``Interrupted`` if a stop was requested: call it between steps of any long loop."""
    if _requested is not None:
        raise Interrupted(_requested)


def _handler(signum: int, frame) -> None:  # noqa: ARG001 - the signal module's signature
    if _requested is not None and signum == signal.SIGINT:
        raise KeyboardInterrupt  # a second Ctrl-C: stop now
    request(signum)
    print(f"received {signal.Signals(signum).name}: stopping at the next step (Ctrl-C again to stop now)",
          file=sys.stderr, flush=True)


@contextmanager
def stop_on_signals(signums: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)) -> Iterator[None]:
    """Record SIGTERM / SIGINT as stop requests while the block runs; the previous handlers come back after it."""
    reset()
    previous = {s: signal.getsignal(s) for s in signums}
    for s in signums:
        signal.signal(s, _handler)
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        reset()


__all__ = ["Interrupted", "check", "request", "requested", "reset", "stop_on_signals"]
