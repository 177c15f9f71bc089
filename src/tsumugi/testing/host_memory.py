"""Host memory of the running process, from /proc/self/status (Linux): for benchmarks and memory tests.

The kernel keeps a high-water mark of the whole resident set (VmHWM) only; that includes file pages
mapped from the page cache, which it can drop under pressure. What a process allocated itself is its
anonymous memory (RssAnon), whose peak :class:`PeakSampler` samples from a background thread.
"""

from __future__ import annotations

import threading


def status_kib(field: str) -> int:
    """A ``kB`` field of /proc/self/status (VmHWM, VmRSS, RssAnon...)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field} (Linux only)")


class PeakSampler:
    """The highest value (KiB) of a /proc/self/status field (RssAnon by default; VmRSS for the resident
    set, file pages included) seen from its start, polled every ``interval`` seconds; ``start`` is the
    value when it was created."""

    def __init__(self, field: str = "RssAnon", interval: float = 0.002):
        self.field = field
        self.start = self.peak = status_kib(field)
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.peak = max(self.peak, status_kib(self.field))

    def value(self) -> int:
        """The peak so far, including the present value."""
        self.peak = max(self.peak, status_kib(self.field))
        return self.peak

    def stop(self) -> int:
        """Stop polling; returns the peak."""
        self._stop.set()
        self._thread.join()
        return self.value()
