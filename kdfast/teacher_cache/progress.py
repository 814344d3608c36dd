"""The teacher cache's progress bar: tokens done of all, and this run's tokens per second."""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class TokenProgress:
    def __init__(self, total_tokens: int, done_tokens: int, console: Console | None, show: bool):
        self.progress = Progress(TextColumn("teacher cache"), BarColumn(), MofNCompleteColumn(), TextColumn("tokens"),
                                 TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                                 console=console, disable=not show)
        self.task = self.progress.add_task("cache", total=total_tokens, completed=done_tokens, rate="")
        self.tokens, self.started = 0, time.perf_counter()

    def advance(self, tokens: int) -> None:
        # This run's rate: tokens from shards a killed run finished do not count.
        self.tokens += tokens
        rate = self.tokens / max(time.perf_counter() - self.started, 1e-9)
        self.progress.update(self.task, advance=tokens, rate=f"{rate:,.0f} tokens/s")

    def __enter__(self):
        self.progress.start()
        return self

    def __exit__(self, *exc):
        self.progress.stop()
