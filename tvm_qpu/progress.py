"""A status line on stderr for long runs (the emulator's first-use compile, long emulated regions).

Shown on a terminal only: when stderr is not a TTY (piped, logged, a test) nothing is written,
unless ``TVM_QPU_PROGRESS=1`` forces it (then each update is a plain line, at most one a second);
``TVM_QPU_PROGRESS=0`` turns it off on a terminal too. Nothing is shown for work that ends within
:data:`DELAY_SECONDS`, so quick runs stay silent.

Whoever drives a long job (the ``tvmc`` CLI) opens one with :func:`status_line` and sets its
``phase`` ("timed run 3/10"); the code doing the work (:mod:`tvm_qpu.executor`) reports what it is
doing with ``current().update(text, started)``. Outside a :func:`status_line`, :func:`current`
returns a line that writes nothing.
"""
from __future__ import annotations

import os
import shutil
import sys
import time
from contextlib import contextmanager

ENV = "TVM_QPU_PROGRESS"
DELAY_SECONDS = 1.0          # nothing is shown for work shorter than this
TTY_INTERVAL = 0.2           # redraw rate on a terminal
LINE_INTERVAL = 1.0          # at most one plain line a second when forced on a non-terminal


def _mode(stream) -> str:
    """"tty" (redraw one line), "lines" (forced on a non-terminal) or "off"."""
    env = os.environ.get(ENV, "").strip().lower()
    if env in ("0", "no", "off", "never", "false"):
        return "off"
    tty = bool(getattr(stream, "isatty", lambda: False)())
    if tty:
        return "tty"
    return "lines" if env in ("1", "yes", "on", "always", "true") else "off"


class StatusLine:
    """One self-overwriting line on ``stream`` (default stderr); see the module docstring."""

    def __init__(self, stream=None, mode: str | None = None):
        self.stream = stream if stream is not None else sys.stderr
        self.mode = mode or _mode(self.stream)
        self.phase = ""
        self._shown = ""
        self._last = 0.0

    @property
    def enabled(self) -> bool:
        return self.mode != "off"

    def update(self, text: str, started: float | None = None) -> None:
        """Show ``phase: text`` (throttled), once the work begun at ``started`` (perf_counter) has
        taken longer than DELAY_SECONDS."""
        if self.mode == "off":
            return
        now = time.perf_counter()
        if started is not None and now - started < DELAY_SECONDS:
            return
        if now - self._last < (TTY_INTERVAL if self.mode == "tty" else LINE_INTERVAL):
            return
        self._last = now
        line = f"{self.phase}: {text}" if self.phase else text
        if self.mode == "tty":
            width = max(20, shutil.get_terminal_size((100, 24)).columns - 1)
            self._write("\r" + line[:width] + "\x1b[K")
            self._shown = line
        else:
            self._write(line + "\n")

    def clear(self) -> None:
        """Remove the line (call before printing results)."""
        if self.mode == "tty" and self._shown:
            self._write("\r\x1b[K")
        self._shown = ""
        self._last = 0.0

    def _write(self, s: str) -> None:
        try:
            self.stream.write(s)
            self.stream.flush()
        except (OSError, ValueError):           # closed or broken stderr: progress is optional
            self.mode = "off"


_OFF = StatusLine(stream=None, mode="off")
_CURRENT: StatusLine | None = None


def current() -> StatusLine:
    """The status line opened by :func:`status_line`, or one that writes nothing."""
    return _CURRENT if _CURRENT is not None else _OFF


@contextmanager
def status_line(stream=None):
    """Make a :class:`StatusLine` the current one for the duration; cleared at the end."""
    global _CURRENT
    prev, line = _CURRENT, StatusLine(stream)
    _CURRENT = line
    try:
        yield line
    finally:
        line.clear()
        _CURRENT = prev
