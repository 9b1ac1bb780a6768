"""fastgen's progress bars: tqdm (``tqdm.auto``: a widget in notebooks, text elsewhere) on stderr.

:class:`Progress` keeps the small interface the loops use (``update(n)``, ``n``,
``postfix``, ``close()``). Its count ``n`` is kept even when the bar is disabled:
the naive sampler stops on it."""
import sys
from typing import Optional

from tqdm.auto import tqdm


class Progress:
    """A bar of ``total`` steps named ``desc``; silent when ``enabled`` is false.
    On a terminal it is redrawn in place; elsewhere (logs, CI) at most a line
    every ``every`` seconds."""

    def __init__(self, total: int, desc: str = "", enabled: bool = True, stream=None, every: float = 10.0):
        stream = stream or sys.stderr
        tty = hasattr(stream, "isatty") and stream.isatty()
        self.n = 0
        self._postfix = ""
        self._bar = tqdm(total=total, desc=desc, disable=not enabled, file=stream, leave=True, dynamic_ncols=True,
                         mininterval=0.1 if tty else every, ascii=not tty)

    def update(self, n: int = 1, postfix: Optional[str] = None) -> None:
        self.n += n
        if postfix is not None:
            self.postfix = postfix
        self._bar.update(n)

    @property
    def postfix(self) -> str:
        return self._postfix

    @postfix.setter
    def postfix(self, text: str) -> None:
        self._postfix = text
        self._bar.set_postfix_str(text, refresh=False)  # shown at the next redraw: no extra output per step

    def close(self) -> None:
        self._bar.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
