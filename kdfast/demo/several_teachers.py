"""`kdfast distill --teachers N`: N teachers, each trained on its own contiguous part of the training text (its
"domain": the standard library's files in order, so the parts hold different modules), and students trained on
identical batches of the whole text, at equal steps: one distilled from the teachers' mixture, one with each window
routed to its domain's teacher, one from each teacher alone, one with plain cross-entropy. Each model's held-out
perplexity is measured on each domain's held-out text (the held-out stream cut the same way) and on all of it; the
table says what this run measured."""

from __future__ import annotations

import dataclasses
import math

import torch

import kdfast
from kdfast.demo import report
from kdfast.demo.training import Batches, held_out_loss, held_out_windows


def domains(corpus, count: int) -> list:
    """The corpus cut into `count` contiguous parts of its training and held-out streams, each with its own
    fingerprint (a teacher's cache key)."""
    def cut(tokens, index):
        size = tokens.numel() // count
        return tokens[index * size:(index + 1) * size]

    parts = []
    for index in range(count):
        parts.append(dataclasses.replace(corpus, train=cut(corpus.train, index), held_out=cut(corpus.held_out, index),
                                         fingerprint=f"{corpus.fingerprint}:part{index + 1}of{count}",
                                         description=f"{corpus.description}, part {index + 1} of {count}"))
    return parts


def mixture_step(teachers: list, settings: dict, vocab: int):
    """The loss of a student distilled from the teachers' mixture (uniform weights): kdfast's fused linear loss over
    every model's last hidden states."""

    def step(model, batch):
        student_hidden = model.get_decoder()(input_ids=batch).last_hidden_state[:, :-1]
        with torch.no_grad():
            hidden = [teacher.get_decoder()(input_ids=batch).last_hidden_state[:, :-1] for teacher in teachers]
        return kdfast.linear_multi_teacher_distill_loss(
            student_hidden, model.get_output_embeddings().weight[:vocab], hidden,
            [teacher.get_output_embeddings().weight[:vocab] for teacher in teachers], batch[:, 1:], **settings)

    return step


class DomainBatches(Batches):
    """The batches of `Batches` (same seed, same windows) with each window's domain: the part of the text, cut as
    `domains` cuts it, that its first token lies in."""

    def __init__(self, tokens, batch_size: int, seq_len: int, seed: int, count: int):
        super().__init__(tokens, batch_size, seq_len, seed)
        self.part, self.count = tokens.numel() // count, count

    def __next__(self) -> dict:
        starts = self.next_starts()
        return {"windows": self.windows(starts), "teacher_id": (starts // self.part).clamp(max=self.count - 1)}


def routed_step(teachers: list, settings: dict, vocab: int):
    """The loss of a student whose every window learns from its own domain's teacher (`DomainBatches`): each teacher
    runs on its windows alone, and kdfast's routed fused linear loss runs each row's own head alone."""

    def step(model, batch):
        windows, route = batch["windows"], batch["teacher_id"]
        student_hidden = model.get_decoder()(input_ids=windows).last_hidden_state[:, :-1]
        hidden = []
        with torch.no_grad():
            for index, teacher in enumerate(teachers):
                mine = windows[route == index]
                if mine.shape[0] == 0:
                    head = teacher.get_output_embeddings().weight
                    hidden.append(head.new_empty(0, head.shape[-1]))
                    continue
                states = teacher.get_decoder()(input_ids=mine).last_hidden_state[:, :-1]
                hidden.append(states.reshape(-1, states.shape[-1]))
        return kdfast.linear_multi_teacher_distill_loss(
            student_hidden, model.get_output_embeddings().weight[:vocab], hidden,
            [teacher.get_output_embeddings().weight[:vocab] for teacher in teachers], windows[:, 1:],
            weights=route[:, None].expand(student_hidden.shape[:-1]), **settings)

    return step


def perplexities(models: dict, parts: list, args) -> list[dict]:
    """Each model's held-out perplexity on each domain and on all of them (the domains' windows together)."""
    windows = [held_out_windows(part.held_out, args.seq_len, args.eval_windows // len(parts)) for part in parts]
    rows = []
    for name, model in models.items():
        losses = [held_out_loss(model, part_windows, args.batch_size) for part_windows in windows]
        counts = [part_windows.shape[0] for part_windows in windows]
        overall = sum(loss * count for loss, count in zip(losses, counts)) / sum(counts)
        rows.append({"model": name, **{f"domain {i + 1}": round(math.exp(loss), 2) for i, loss in enumerate(losses)},
                     "all domains": round(math.exp(overall), 2)})
    return rows


def write_report(rows: list[dict], args, console, seconds: float, device: str) -> None:
    from rich.table import Table

    table = Table(title=f"held-out perplexity at {args.steps} steps ({args.teachers} teachers, one per domain)")
    for column in rows[0]:
        table.add_column(column, justify="left" if column == "model" else "right")
    for row in rows:
        table.add_row(*(str(value) for value in row.values()))
    console.print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"distill_teachers_{report.device_tag(device)}"
    stem.with_suffix(".md").write_text(
        f"# kdfast distill --teachers {args.teachers}\n\n{args.steps} student steps (batch {args.batch_size} x "
        f"{args.seq_len}), teachers {args.teacher_steps} steps each on their own domain, temperature "
        f"{args.temperature}, kd_weight {args.kd_weight}, ce_weight {args.ce_weight}; {seconds:.0f} s in all.\n\n"
        + report.csv_and_markdown(rows, stem.with_suffix(".csv")))
    console.print(f"wrote {stem}.csv and {stem}.md")
