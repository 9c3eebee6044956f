"""The progress bar the transfer commands (store, move, get) draw on a terminal."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Any

from dicomnet.status import Status

__all__ = ["ProgressBar", "failure_reason", "format_duration", "track"]

WIDTH = 30  # characters of the bar itself
REDRAW = 0.1  # seconds between two redraws at most


def format_duration(seconds: float) -> str:
    """`0:07`, `12:34`, `1:02:03`."""
    whole = max(0, round(seconds))
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


@dataclass
class ProgressBar:
    """Counts of a transfer (completed, warning, failed of `total`) and, when `bytes_known`,
    its bytes; `draw()` rewrites one line on stderr (when `show`: stderr is a terminal and
    the user did not ask for none), at most ten times a second.

    The line: ``[#########.....] 12/40 files, failed 1, warning 0, 3.1 MB, 1.2 MB/s, ETA 0:07``
    (the ETA from the counts: the time per operation so far times those remaining)."""

    total: int = 0
    show: bool = False
    unit: str = "files"
    bytes_known: bool = True
    completed: int = 0
    warning: int = 0
    failed: int = 0
    bytes_done: int = 0
    started: float = field(default_factory=time.perf_counter)
    last_draw: float = 0.0

    @property
    def done(self) -> int:
        return self.completed + self.warning + self.failed

    @property
    def elapsed(self) -> float:
        return max(time.perf_counter() - self.started, 1e-9)

    @property
    def megabytes_per_second(self) -> float:
        return self.bytes_done / 1e6 / self.elapsed

    def eta(self) -> float | None:
        """Seconds left at the pace so far; None before the first operation is done."""
        done = self.done
        if done == 0 or self.total <= done:
            return None
        return self.elapsed / done * (self.total - done)

    def line(self) -> str:
        done = self.done
        filled = min(WIDTH, int(WIDTH * done / self.total)) if self.total else WIDTH
        parts = [
            f"[{'#' * filled}{'.' * (WIDTH - filled)}] {done}/{self.total} {self.unit}",
            f"failed {self.failed}",
            f"warning {self.warning}",
        ]
        if self.bytes_known:
            parts.append(f"{self.bytes_done / 1e6:.1f} MB")
            parts.append(f"{self.megabytes_per_second:.1f} MB/s")
        eta = self.eta()
        if eta is not None:
            parts.append(f"ETA {format_duration(eta)}")
        return ", ".join(parts)

    def draw(self, force: bool = False) -> None:
        if not self.show:
            return
        now = time.perf_counter()
        if not force and now - self.last_draw < REDRAW:
            return
        self.last_draw = now
        # Padded: a shorter line must cover what the one before it left.
        sys.stderr.write(f"\r{self.line():<{WIDTH + 70}}")
        sys.stderr.flush()

    def abandon(self) -> None:
        """End the line drawn so far (the command stops with an error, said on a line of
        its own)."""
        if self.show and self.last_draw:
            sys.stderr.write("\n")
            sys.stderr.flush()
            self.last_draw = 0.0

    def finish(self) -> None:
        """The last drawing, and the end of its line (nothing if nothing was drawn)."""
        if not self.show:
            return
        self.draw(force=True)
        sys.stderr.write("\n")
        sys.stderr.flush()
        self.last_draw = 0.0  # the line is ended


def failure_reason(progress: Any) -> str:
    """Why the final response's failed instances failed, as far as it says: its status
    (when not a success) and its Error Comment."""
    status = progress.status
    parts = []
    if status is not None and not Status(int(status)).is_success:
        parts.append(repr(Status(int(status))))
    comment = getattr(progress, "error_comment", None)
    if comment:
        parts.append(str(comment))
    return ": ".join(parts)


def track(bar: ProgressBar, progress: Any) -> None:
    """Take a C-MOVE or C-GET response's sub-operation counts into the bar (total: those
    done plus those remaining, when the response says how many remain)."""
    bar.completed = progress.completed or 0
    bar.failed = progress.failed or 0
    bar.warning = progress.warning or 0
    if progress.remaining is not None:
        bar.total = bar.done + progress.remaining
    bar.total = max(bar.total, bar.done)
