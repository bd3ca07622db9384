"""Opt-in timeline marks for profiling an engine step from the host (benchmarks only).

mark(name) appends (name, perf_counter_ns) while a trace is active and does nothing otherwise,
so the connectors can leave their marks in place at no cost."""
from __future__ import annotations

import time

_marks: list[tuple[str, int]] | None = None


def start() -> None:
    global _marks
    _marks = []


def stop() -> list[tuple[str, int]]:
    """Ends the trace; returns its marks in order."""
    global _marks
    marks, _marks = _marks or [], None
    return marks


def mark(name: str) -> None:
    if _marks is not None:
        _marks.append((name, time.perf_counter_ns()))
