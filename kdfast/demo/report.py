"""The demo's report: every number printed or written here was measured in the same run (rich table, Markdown,
CSV and a PNG of the held-out loss curves)."""

from __future__ import annotations

import csv
import datetime
import math
import platform
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.table import Table


@dataclass
class Summary:
    corpus: str
    device: str
    settings: dict
    steps: int
    eval_tokens: int
    teacher_loss: float
    teacher_record: dict
    teacher_params: int
    student_params: int
    runs: dict  # "distilled", "plain" -> training.RunResult; "cached" -> [RunResult] (first: beside the others)
    costs: dict  # name -> (median seconds, extra peak bytes)
    total_seconds: float
    cache_stats: dict = field(default_factory=dict)  # k -> the teacher cache's stats (TeacherCache.stats)


def device_tag(device: str) -> str:
    name = torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else platform.machine()
    return "".join(c if c.isalnum() else "_" for c in name).strip("_").lower() or "cpu"


def rows(summary: Summary) -> list[dict]:
    """One row per model state compared; losses are held-out nats per token."""
    distilled, plain = summary.runs["distilled"], summary.runs["plain"]
    teacher_steps = summary.teacher_record.get("steps", "checkpoint")
    # A cached teacher's steps and seconds are from the run that trained it; its loss is measured in this one.
    teacher_name = "teacher (cached)" if "cached_at" in summary.teacher_record else "teacher"
    table = [(teacher_name, summary.teacher_params, teacher_steps, summary.teacher_record.get("train_seconds", ""),
              summary.teacher_loss)]
    if "equal steps" in plain.marks:
        step, seconds, loss = plain.marks["equal steps"]
        table.append(("student, plain CE (equal steps)", summary.student_params, step, round(seconds, 1), loss))
    table.append(("student, distilled with kdfast", summary.student_params, distilled.steps,
                  round(distilled.seconds, 1), distilled.curve[-1][2]))
    step, seconds, loss = plain.marks.get(f"equal wall time: {distilled.name}", plain.curve[-1])
    table.append(("student, plain CE (equal wall time)", summary.student_params, step, round(seconds, 1), loss))
    for index, run in enumerate(summary.runs.get("cached", [])):
        table.append((run.name, summary.student_params, run.steps, round(run.seconds, 1), run.curve[-1][2]))
        mark = plain.marks.get(f"equal wall time: {run.name}")
        if index == 0 and mark is not None:
            table.append((plain_at_wall_time_of(run), summary.student_params, mark[0], round(mark[1], 1), mark[2]))
    return [dict(model=name, parameters=params, steps=steps, train_seconds=seconds, held_out_loss=round(loss, 4),
                 perplexity=round(math.exp(loss), 2)) for name, params, steps, seconds, loss in table]


def plain_at_wall_time_of(run) -> str:
    return f"student, plain CE (equal wall time, {run.name.removeprefix('student, ')})"


def cached_findings(summary: Summary, by_name: dict) -> list[str]:
    """How the students of a cached teacher compare: with the online teacher at equal steps, and with plain CE at the
    main one's wall time; and what each cache cost to build and store."""
    runs = summary.runs.get("cached", [])
    if not runs:
        return []
    online = by_name["student, distilled with kdfast"]
    online_step_ms = summary.runs["distilled"].seconds / summary.runs["distilled"].steps * 1e3
    lines = []
    for index, run in enumerate(runs):
        perplexity = by_name[run.name]
        line = (f"{run.name.removeprefix('student, ').capitalize()}: perplexity {perplexity:.1f} at {run.steps} steps, "
                f"{perplexity / online - 1:+.1%} vs the online teacher's student ({online:.1f}); "
                f"{run.seconds / run.steps * 1e3:.0f} ms per step vs {online_step_ms:.0f} with the teacher online")
        mark = summary.runs["plain"].marks.get(f"equal wall time: {run.name}")
        if index == 0 and mark is not None:
            plain = by_name[plain_at_wall_time_of(run)]
            change = perplexity / plain - 1
            # Plain CE's first steps may already have taken longer than this student's whole run: then it is
            # compared with plain CE given more time than it had, which favours plain CE.
            when = (f"at equal wall time ({run.seconds:.0f} s)" if mark[1] <= run.seconds * 1.01 else
                    f"against plain CE given more time ({mark[1]:.0f} s for its first {mark[0]} steps vs "
                    f"{run.seconds:.0f} s)")
            line += f"; {when} {abs(change):.1%} {'lower' if change < 0 else 'higher'} than plain CE's ({plain:.1f})"
        lines.append(line)
    for kind, stats in summary.cache_stats.items():
        built = (f"built at {stats['tokens_per_second']:,.0f} tokens/s ({stats['seconds']:.1f} s)"
                 if stats["tokens_per_second"] else "reused from an earlier run")
        mass = (f"; the stored ids hold {stats['mass']:.1%} of the teacher's probability on average"
                if stats.get("mass") is not None else "")
        lines.append(f"Teacher cache, {kind}: {stats['tokens']:,} tokens, {stats['bytes_per_token']:.0f} bytes/token, "
                     f"{built}{mass}")
    return lines


def findings(summary: Summary, table: list[dict]) -> list[str]:
    by_name = {row["model"]: row["perplexity"] for row in table}
    distilled = by_name["student, distilled with kdfast"]
    lines = []

    def compare(label, other):
        change = distilled / other - 1
        word = "lower" if change < 0 else "higher"
        return f"{label}: the distilled student's perplexity is {abs(change):.1%} {word} than plain CE's " \
               f"({distilled:.1f} vs {other:.1f})"

    if "student, plain CE (equal steps)" in by_name:
        lines.append(compare(f"Equal steps ({summary.steps})", by_name["student, plain CE (equal steps)"]))
    plain = summary.runs["plain"]
    lines.append(compare(f"Equal wall time ({plain.seconds:.0f} s of training; plain CE took {plain.steps} steps, "
                         f"the students stepping in turn up to step {summary.steps})",
                         by_name["student, plain CE (equal wall time)"]))
    lines.extend(cached_findings(summary, by_name))
    teacher = table[0]["perplexity"]
    best_student = min(row["perplexity"] for row in table[1:])
    ratio = teacher / best_student
    verdict = "clearly stronger" if ratio < 0.8 else "NOT clearly stronger: train it longer (--teacher-steps)"
    lines.append(f"Teacher perplexity {teacher:.1f} is {ratio:.2f}x the best student's: {verdict}")
    record = summary.teacher_record
    if "cached_at" in record:
        lines.append(f"The teacher was trained by an earlier run ({record['steps']} steps, "
                     f"{record['train_seconds']} s) and loaded from {record['cached_at']}")
    (fused_s, fused_peak), (eager_s, eager_peak) = summary.costs["kdfast fused loss"], summary.costs[
        "eager PyTorch loss"]
    lines.append(f"Per distillation step (student fwd+bwd with the teacher's forward, median of 5): kdfast fused "
                 f"loss {fused_s * 1e3:.0f} ms, eager PyTorch loss {eager_s * 1e3:.0f} ms ({eager_s / fused_s:.2f}x); "
                 f"extra peak memory {fused_peak / 2**20:.0f} MiB vs {eager_peak / 2**20:.0f} MiB")
    lines.append(f"Whole run: {summary.total_seconds:.0f} s on {summary.device}")
    return lines


def plot(summary: Summary, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (by_step, by_time) = plt.subplots(1, 2, figsize=(11, 4.2))
    curves = [("student, plain CE", summary.runs["plain"].curve),
              ("student, distilled (kdfast)", summary.runs["distilled"].curve)]
    curves += [(run.name.removeprefix("student, "), run.curve) for run in summary.runs.get("cached", [])]
    for label, curve in curves:
        by_step.plot([c[0] for c in curve], [c[2] for c in curve], marker=".", label=label)
        by_time.plot([c[1] for c in curve], [c[2] for c in curve], marker=".", label=label)
    for axes, xlabel in ((by_step, "training step"), (by_time, "training seconds")):
        axes.axhline(summary.teacher_loss, color="gray", linestyle="--", label="teacher")
        axes.set_xlabel(xlabel)
        axes.set_ylabel("held-out loss (nats/token)")
        axes.grid(alpha=0.3)
        axes.legend()
    by_step.axvline(summary.steps, color="black", linewidth=0.6)
    figure.suptitle(f"kdfast distill: {summary.corpus}", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def print_and_write(summary: Summary, console, out_dir: Path):
    table = rows(summary)
    lines = findings(summary, table)
    shown = Table(title=f"Held-out perplexity ({summary.eval_tokens} tokens), {summary.settings}")
    for column in table[0]:
        shown.add_column(column, justify="left" if column == "model" else "right")
    for row in table:
        shown.add_row(*(str(value) for value in row.values()))
    console.print(shown)
    for line in lines:
        console.print(f"- {line}")

    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"distill_demo_{device_tag(summary.device)}"
    stem.with_suffix(".md").write_text(
        f"# kdfast distill ({datetime.date.today()}, torch {torch.__version__}, {summary.device})\n\n"
        f"Corpus: {summary.corpus}. Loss settings: {summary.settings}. Held-out: {summary.eval_tokens} tokens.\n\n"
        + csv_and_markdown(table, stem.with_suffix(".csv")) + "\n" + "".join(f"- {line}\n" for line in lines))
    plot(summary, stem.with_suffix(".png"))
    console.print(f"wrote {stem}.md, .csv and .png")


def csv_and_markdown(table: list[dict], csv_path) -> str:
    """Writes the rows (dicts of one set of keys) to `csv_path` and returns them as a Markdown table."""
    with open(csv_path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)
    header = "| " + " | ".join(table[0]) + " |\n| " + " | ".join("---" for _ in table[0]) + " |\n"
    return header + "".join("| " + " | ".join(str(v) for v in row.values()) + " |\n" for row in table)
