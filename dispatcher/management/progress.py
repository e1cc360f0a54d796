"""How far a management command got through its rows, shown on its stderr (stdout keeps the
command's report, which scripts parse): a tqdm bar when stderr is a terminal, otherwise a
plain line every LOG_EVERY seconds and one at the end, which read well in a log file or a cron
e-mail where a bar's carriage returns would not. Nothing at ``--verbosity 0``.

A Progress is the ``progress`` callable the operations take: called with (done, total) after
each chunk, batch or step."""

from __future__ import annotations

import math
import time
from types import TracebackType

from django.core.management.base import OutputWrapper
from tqdm import tqdm

#: Seconds between two plain progress lines.
LOG_EVERY = 5.0


class _Raw:
    """The file tqdm writes to: the command's stderr without the newline and the error colour
    OutputWrapper adds to each write; its encoding tells tqdm whether to draw with Unicode."""

    def __init__(self, stream: OutputWrapper) -> None:
        self.stream = stream
        self.encoding = getattr(stream, "encoding", None)

    def write(self, text: str) -> None:
        self.stream.write(text, style_func=str, ending="")

    def flush(self) -> None:
        self.stream.flush()


class Progress:
    """``with Progress(self.stderr, "deleting", "dispatches", verbosity) as progress:
    operation(progress=progress)``."""

    def __init__(self, stream: OutputWrapper, what: str, unit: str, verbosity: int = 1) -> None:
        self.stream, self.what, self.unit = stream, what, unit
        self.quiet = verbosity < 1
        self.interactive = stream.isatty()
        self.bar: tqdm | None = None
        self.shown = -math.inf  # when the last plain line was written
        self.unshown: tuple[int, int] | None = None  # the state since then

    def __call__(self, done: int, total: int) -> None:
        if self.quiet or not total:
            return
        total = max(total, done)  # rows added while the command runs
        if self.interactive:
            if self.bar is None:  # drawn at once with the first chunk's state
                self.bar = tqdm(
                    total=total,
                    initial=done,
                    desc=self.what,
                    unit=f" {self.unit}",
                    file=_Raw(self.stream),
                )
            else:
                self.bar.total = total
                self.bar.update(done - self.bar.n)
        elif done >= total or time.monotonic() - self.shown >= LOG_EVERY:
            self.line(done, total)
        else:
            self.unshown = (done, total)

    def line(self, done: int, total: int) -> None:
        self.stream.write(
            f"{self.what}: {done} of {total} {self.unit} ({100 * done / total:.0f}%)",
            style_func=str,
        )
        self.shown, self.unshown = time.monotonic(), None

    def close(self) -> None:
        """Ends the bar, or writes the last state if its line is still due."""
        if self.bar is not None:
            self.bar.close()
        elif self.unshown is not None:
            self.line(*self.unshown)

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
