"""The loss's parts (kdfast.LossComponents) summed over a trainer's micro-batches between two logs, kept on the device
so that no step waits on the host; read once per log."""

from __future__ import annotations

import torch


class LoggedParts:
    def __init__(self, teacher_names: list[str] | None = None):
        self.teacher_names = teacher_names  # several teachers' names (their positions where None)
        self._sums: dict[str, torch.Tensor] = {}
        self._batches = 0

    def add(self, parts, scale: float = 1.0) -> None:
        """`parts`: one micro-batch's LossComponents. kd, ce, z, the student's entropy, with several teachers each
        one's own divergence (`kd_loss_teacher_<m>`, m its name or position) and, for GOLD's hybrid, its matched and
        unmatched parts (`matched_loss`, `unmatched_loss`, TRL's names) are summed like the loss (each micro-batch's
        share of its optimizer step); the token accuracy is averaged over micro-batches."""
        teachers = getattr(parts, "teachers", None)
        each = []
        if teachers is not None:
            names = self.teacher_names or [str(index) for index in range(len(teachers))]
            each = [(f"kd_loss_teacher_{name}", value, scale) for name, value in zip(names, teachers)]
        for name, value, factor in (("kd_loss", parts.kd, scale), ("ce_loss", parts.ce, scale),
                                    ("z_loss", parts.z_loss, scale), ("entropy", parts.entropy, scale),
                                    ("token_accuracy", parts.accuracy, 1.0),
                                    ("matched_loss", getattr(parts, "matched", None), scale),
                                    ("unmatched_loss", getattr(parts, "unmatched", None), scale), *each):
            if value is not None:
                value = value.detach().float() * factor
                self._sums[name] = self._sums[name] + value if name in self._sums else value
        self._batches += 1

    def pop(self, optimizer_steps: int) -> dict[str, float]:
        """The averages since the last pop (kd_loss, ce_loss, z_loss, entropy per optimizer step, token_accuracy per
        micro-batch), and a fresh start."""
        out = {}
        for name, total in self._sums.items():
            divisor = self._batches if name == "token_accuracy" else optimizer_steps
            out[name] = round(float(total) / max(1, divisor), 4)
        self._sums, self._batches = {}, 0
        return out

    def pop_batch_means(self, reduce=None) -> dict[str, float]:
        """Every part's mean over the batches since the last pop, as the Trainer averages an evaluation's loss (each
        batch's loss once, every process's batches together: `reduce` sums a tensor over the processes), and a fresh
        start."""
        totals, batches = {name: total.reshape(()) for name, total in self._sums.items()}, self._batches
        self._sums, self._batches = {}, 0
        if not totals:
            return {}
        count = torch.tensor(float(batches), device=next(iter(totals.values())).device)
        if reduce is not None:
            count, totals = reduce(count), {name: reduce(total) for name, total in totals.items()}
        # Not rounded: the Trainer leaves eval_loss as it is (a KL of a close student is 1e-3 or less).
        return {name: float(total) / max(1.0, float(count)) for name, total in totals.items()}
