"""A rich progress bar for training runs (loss, lr, throughput, last eval); drawn on a console the CLI passes in."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class RichReporter:
    """Implements :class:`lorakit.train.loop.Reporter` with a ``rich`` progress bar."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                 TimeRemainingColumn(), TextColumn("{task.fields[info]}"), console=console)
        self.task_id = None
        self.last_eval = ""

    def start(self, total_steps: int, start_step: int) -> None:
        self.progress.start()
        self.task_id = self.progress.add_task("train", total=total_steps, completed=start_step, info="")

    def step(self, step: int, record: dict[str, Any]) -> None:
        info = (f"loss {record['loss']:.4f}  lr {record['lr']:.2e}  {record['examples_per_s']:.1f} ex/s"
                f"{self.last_eval}")
        self.progress.update(self.task_id, completed=step, info=info)

    def evaluated(self, step: int, metrics: dict[str, float]) -> None:
        shown = "  ".join(f"{k} {v:.4f}" for k, v in metrics.items())
        self.last_eval = f"  | eval@{step}: {shown}"
        if self.task_id is None:
            self.console.print(f"eval before training: {shown}")
        else:
            self.progress.console.print(f"eval at step {step}: {shown}")

    def end(self) -> None:
        self.progress.stop()
