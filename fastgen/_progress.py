"""A small progress bar (no dependency): redrawn in place on a terminal,
a line every ``every`` seconds otherwise (logs, CI)."""
import sys
import time


class Progress:
    def __init__(self, total, desc="", enabled=True, stream=None, every=10.0):
        self.total, self.desc, self.enabled = total, desc, enabled
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.every, self.n, self.t0, self.last = every, 0, time.perf_counter(), 0.0
        self.postfix = ""

    def update(self, n=1, postfix=None):
        self.n += n
        if postfix is not None:
            self.postfix = postfix
        if not self.enabled:
            return
        now = time.perf_counter()
        if self.n >= self.total or (self.tty and now - self.last > 0.1) or (not self.tty and now - self.last > self.every):
            self.last = now
            self._draw(now)

    def _draw(self, now):
        elapsed = now - self.t0
        rate = self.n / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.n) / rate if rate > 0 else 0.0
        width = 24
        filled = int(width * self.n / max(self.total, 1))
        line = (f"{self.desc} [{'#' * filled}{'.' * (width - filled)}] {self.n}/{self.total} "
                f"{elapsed:.0f}s<{eta:.0f}s {rate:.2f}it/s {self.postfix}")
        self.stream.write(("\r" + line + " " * 4) if self.tty else line + "\n")
        self.stream.flush()

    def close(self):
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()
