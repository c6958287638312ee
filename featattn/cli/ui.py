"""The one terminal UI of featattn: progress bars and tables for ``featattn demo``,
``featattn bench``, ``featattn info`` and :func:`featattn.hf.transfer_attention`.

rich draws them on a terminal; when the stream is not a terminal (CI logs, pipes, files), TERM
is ``dumb`` or rich is not installed (it is the optional ``bench`` extra), they are plain lines:
a progress line every tenth of a run and a markdown table, easy to grep and to paste.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from typing import Optional, Sequence

__all__ = ["UI", "PROGRESS_LINE"]

#: the plain progress line, a ``str.format`` template of name, step, total, info and elapsed
PROGRESS_LINE = "  {name:<10} {step:>6}/{total:<6} {info}  {elapsed:6.1f}s"


def _rich_terminal(stderr: bool) -> bool:
    """Whether rich is importable and the stream is a terminal that can draw it."""
    try:
        from rich.console import Console

        return Console(stderr=stderr).is_terminal and os.environ.get("TERM") != "dumb"
    except Exception:  # rich missing (or blocked) or unusable: plain lines
        return False


class UI:
    """Tables and progress on stdout (``stderr=True``: on stderr): rich on a terminal, plain
    lines otherwise.  ``fancy`` forces rich on (when installed) or off; ``None`` decides from
    the stream."""

    def __init__(self, fancy: Optional[bool] = None, stderr: bool = False):
        self.stderr = stderr
        if fancy is None:
            fancy = _rich_terminal(stderr)
        else:
            try:
                import rich  # noqa: F401
            except ImportError:
                fancy = False
        self.fancy = bool(fancy)

    @property
    def stream(self):
        # looked up on every write: sys.stdout / sys.stderr may be replaced (pytest, redirects)
        return sys.stderr if self.stderr else sys.stdout

    def _console(self):
        from rich.console import Console

        return Console(highlight=False, stderr=self.stderr)

    def print(self, msg: str = "") -> None:
        print(msg, file=self.stream, flush=True)

    def table(self, title: str, columns: Sequence[str], rows: Sequence[Sequence[str]],
              right: Sequence[bool] = ()) -> None:
        """A rich table on a terminal, else a plain markdown table (one line per row, so
        logs stay greppable and the table can be pasted into docs)."""
        right = list(right) + [False] * (len(columns) - len(right))
        if self.fancy:
            from rich import box
            from rich.table import Table

            t = Table(title=title, box=box.ROUNDED, title_justify="left")
            for c, r in zip(columns, right):
                t.add_column(c, justify="right" if r else "left", overflow="fold")
            for row in rows:
                t.add_row(*row)
            self._console().print(t)
            self.stream.flush()
            return
        widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c)
                  for i, c in enumerate(columns)]

        def line(cells):
            return "| " + " | ".join(
                (c.rjust(w) if r else c.ljust(w)) for c, w, r in zip(cells, widths, right)) + " |"

        self.print(title)
        self.print(line(columns))
        self.print("|" + "|".join(("-" * (w + 1) + ":") if r else ("-" * (w + 2))
                                  for w, r in zip(widths, right)) + "|")
        for row in rows:
            self.print(line(row))

    @contextlib.contextmanager
    def progress(self, line: str = PROGRESS_LINE):
        """Yields ``add(name, total) -> update(step, info="")``: one bar per ``add``.  Plain
        lines (``line``, a template of name, step, total, info, elapsed) come at every tenth
        of a run."""
        if self.fancy:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                       TimeElapsedColumn, TimeRemainingColumn)

            columns = [TextColumn("{task.description:<10}"), BarColumn(),
                       MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                       TimeElapsedColumn(), TimeRemainingColumn()]
            with Progress(*columns, console=self._console(), transient=False) as prog:
                def add(name, total):
                    task = prog.add_task(name, total=total, info="")

                    def update(step, info=""):
                        prog.update(task, completed=step, info=info)
                    return update
                yield add
            return

        def add(name, total):
            t0 = time.perf_counter()
            marks = {max(1, round(total * i / 10)) for i in range(1, 11)}

            def update(step, info=""):
                if step in marks:
                    self.print(line.format(name=name, step=step, total=total, info=info,
                                           elapsed=time.perf_counter() - t0))
            return update
        yield add
