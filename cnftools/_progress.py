"""Signs of life from long solves: the time reached and the evaluations so far.

A solve reports after each step (:data:`cnftools._ode.Progress`); this module turns that into a
line on stderr, at most once a second and only once the solve has run for :data:`DELAY` seconds,
so short solves print nothing. Whether to report: ``progress=True`` always, ``False`` never,
``None`` when stderr is a terminal. A caller with a display of its own (the dataset-NLL progress
bar) installs a :func:`reporting_to` sink instead, and solves inside it report there.
"""

from __future__ import annotations

import contextlib
import contextvars
import sys
import time
from collections.abc import Callable, Iterator

__all__ = ["DELAY", "INTERVAL", "SolveProgress", "reporter", "reporting", "reporting_to"]

DELAY = 3.0
"""Seconds a solve runs before its first report."""

INTERVAL = 1.0
"""Seconds between two reports."""

Sink = Callable[[str], None]

_OFF = "off"
_SINK: contextvars.ContextVar[Sink | str | None] = contextvars.ContextVar(
    "cnftools_progress", default=None
)


@contextlib.contextmanager
def reporting_to(sink: Sink) -> Iterator[None]:
    """Solves inside report their progress text to ``sink`` (instead of stderr)."""
    token = _SINK.set(sink)
    try:
        yield
    finally:
        _SINK.reset(token)


@contextlib.contextmanager
def reporting(progress: bool | None) -> Iterator[None]:
    """The progress setting of a public entry point for the solves inside it: ``True`` reports
    (to an installed sink, else stderr), ``False`` never, ``None`` keeps an installed sink or
    reports to stderr when it is a terminal."""
    current = _SINK.get()
    if progress is False:
        value: Sink | str | None = _OFF
    elif callable(current):
        value = current
    elif progress or (current is None and sys.stderr.isatty()):
        value = _stderr_line
    else:
        value = _OFF
    token = _SINK.set(value)
    try:
        yield
    finally:
        _SINK.reset(token)


def reporter(context: str, start: float, end: float) -> SolveProgress | None:
    """The reporter of one solve under the current setting (``None``: report nothing)."""
    sink = _SINK.get()
    return SolveProgress(context, start, end, sink) if callable(sink) else None


class SolveProgress:
    """``progress(t_reached, evaluations)`` for one solve from ``start`` to ``end``.

    Example:
        >>> lines = []
        >>> report = SolveProgress("log_likelihood", 1.0, 0.0, lines.append, delay=0.0)
        >>> report(0.25, 120)
        >>> lines[0].startswith("log_likelihood: t = 0.25 (75% of the way), 120 evaluations")
        True
    """

    def __init__(
        self,
        context: str,
        start: float,
        end: float,
        sink: Sink,
        *,
        delay: float = DELAY,
        interval: float = INTERVAL,
    ) -> None:
        self.context, self.start, self.end, self.sink = context, start, end, sink
        self.began = time.monotonic()
        self.next_report = self.began + delay
        self.interval = interval
        self.reported = False

    def __call__(self, reached: float, evaluations: int) -> None:
        now = time.monotonic()
        if now < self.next_report:
            return
        self.next_report = now + self.interval
        span = self.end - self.start
        done = abs(100.0 * (reached - self.start) / span) if span else 100.0
        self.sink(
            f"{self.context}: t = {reached:.4g} ({done:.0f}% of the way), {evaluations} "
            f"evaluations, {now - self.began:.0f} s"
        )
        self.reported = True


def _stderr_line(text: str) -> None:
    end = "\r" if sys.stderr.isatty() else "\n"
    print(text, end=end, file=sys.stderr, flush=True)
