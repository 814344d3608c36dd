"""`kdfast distill --cross-tokenizer`: the demo's teacher (trained once with the BPE tokenizer of --vocab-size tokens,
and cached as the default run caches it) teaches students of ANOTHER tokenizer, a BPE of --student-vocab-size tokens
trained on every other training document with each digit a token (corpus.OTHER_TOKENIZER: the two vocabularies share
part of their tokens, and each side's tokens are merged against the other's). Two students of that tokenizer train
on identical batches, stepping in turn: one with kdfast's cross-vocabulary loss (`batch_cross_vocab_loss`: GOLD's
hybrid over the aligned groups of the two tokenizations, from both models' hidden states and heads, plus the
student's CE), one with plain cross-entropy, which then goes on alone until it has trained as long (equal wall
time). Held-out perplexity is per student token, so the students compare directly; bits per byte (every model on the
same held-out text) puts the teacher beside them."""

from __future__ import annotations

import math
import statistics
import time

import torch
import torch.nn.functional as F

import kdfast
from kdfast.demo import report
from kdfast.demo.corpus import OTHER_TOKENIZER, load_corpus
from kdfast.demo.main import adamw, get_teacher, progress_bar
from kdfast.demo.models import STUDENT_SIZE, new_model, parameter_count
from kdfast.demo.training import (
    Batches,
    Run,
    held_out_windows,
    step_costs,
    to_device,
    train_side_by_side,
    warmup_then_constant,
)
from kdfast.integrations.cross_tokenizer import CrossTokenizerCollator, batch_cross_vocab_loss


class SharedBatches:
    """The students' batches: random windows of the student's token stream (`Batches`, one seed), decoded to text and
    collated by `CrossTokenizerCollator` (both tokenizations, cut at one character, and their alignment). Each batch
    is made once, by the first run to need it (its tokenising and aligning counted in that run's step), and read
    again by the other: both students train on identical batches. The plain-CE run's steps past the distilled one's
    take batches tokenised for the student alone (what plain CE needs)."""

    def __init__(self, windows: Batches, collator: CrossTokenizerCollator):
        self.windows, self.collator, self.made = windows, collator, []

    def reader(self, student_only: bool = False):
        shared = self

        class Reader:
            position = 0

            def __next__(self):
                self.position += 1
                if self.position > len(shared.made) and student_only:
                    return shared.student_batch()
                while len(shared.made) < self.position:
                    shared.made.append(shared.collator([{"text": text} for text in shared.texts()]))
                return shared.made[self.position - 1]

        return Reader()

    def texts(self) -> list[str]:
        return self.collator.student_tokenizer.batch_decode(next(self.windows))

    def student_batch(self) -> dict:
        tokenizer = self.collator.student_tokenizer
        encoded = tokenizer(self.texts(), padding=True, truncation=True, max_length=self.collator.max_length,
                            return_tensors="pt")
        return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"],
                "labels": encoded["input_ids"].masked_fill(encoded["attention_mask"] == 0, -100)}


def plain_step(model, batch):
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss


def cross_step(teacher, vocab_map, settings: dict):
    def step(model, batch):
        return batch_cross_vocab_loss(model, teacher, batch, vocab_map, method="hybrid", **settings)[0]

    return step


def logits_step(teacher, vocab_map, settings: dict):
    """The same loss from both models' full logits: what the fused form saves (kdfast's logits-form loss)."""
    settings = dict(settings)
    kd_weight, ce_weight = settings.pop("kd_weight"), settings.pop("ce_weight")

    def step(model, batch):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        with torch.no_grad():
            teacher_logits = teacher(input_ids=batch["teacher_input_ids"],
                                     attention_mask=batch["teacher_attention_mask"]).logits
        kd = kdfast.cross_vocab_distill_loss(logits.flatten(0, 1)[:, :vocab_map.student_size],
                                             teacher_logits.flatten(0, 1)[:, :vocab_map.teacher_size],
                                             vocab_map=vocab_map, alignment=batch["alignment"], method="hybrid",
                                             **settings)
        ce = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten())
        return kd_weight * kd + ce_weight * ce

    return step


@torch.no_grad()
def text_scores(model, tokenizer, texts: list[str], batch_size: int) -> tuple[float, int, int]:
    """(nats, tokens, bytes): the model's summed next-token loss over its own tokenization of each text (every token
    but the first), how many tokens that is, and the UTF-8 bytes those tokens decode to."""
    model.eval()
    nats, tokens, size = 0.0, 0, 0
    for start in range(0, len(texts), batch_size):
        encoded = tokenizer(texts[start:start + batch_size], padding=True, return_tensors="pt")
        ids, mask = encoded["input_ids"].to(model.device), encoded["attention_mask"].to(model.device)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        labels = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        nats += F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum").item()
        tokens += int(mask[:, 1:].sum())
        size += sum(len(tokenizer.decode(row[1:int(kept)]).encode()) for row, kept in zip(ids.tolist(), mask.sum(1)))
    return nats, tokens, size


def collate_ms(shared: SharedBatches, rounds: int = 5) -> float:
    """Median time to tokenise one batch of text with both tokenizers and align them."""
    texts = [{"text": text} for text in shared.texts()]
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        shared.collator(texts)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def run(args, corpus, device, console, started):
    """--cross-tokenizer: `corpus` is the teacher's (its tokenizer the default run's)."""
    teacher_tokenizer = corpus.tokenizer
    with progress_bar(console) as progress:
        teacher, teacher_record = get_teacher(args, corpus, device, console, progress)
    teacher.eval().requires_grad_(False)
    with console.status("the students' tokenizer"):
        students = load_corpus(args.data, args.student_vocab_size, None, args.cache_dir, OTHER_TOKENIZER)
    student_tokenizer = students.tokenizer
    vocab_map = kdfast.VocabMap.from_tokenizers(student_tokenizer, teacher_tokenizer)
    console.print(f"students' tokenizer: BPE of {len(student_tokenizer)} tokens, {students.train.numel() / 1e6:.2f} M "
                  f"training tokens; {vocab_map}")
    collator = CrossTokenizerCollator(student_tokenizer, teacher_tokenizer, args.seq_len + 1)
    shared = SharedBatches(Batches(students.train, args.batch_size, args.seq_len, args.seed), collator)
    windows = held_out_windows(students.held_out, args.seq_len, args.eval_windows)
    settings = dict(divergence=args.divergence, temperature=args.temperature, kd_weight=args.kd_weight,
                    ce_weight=args.ce_weight)
    fused = cross_step(teacher, vocab_map, settings)

    def fresh_student():
        return new_model(STUDENT_SIZE, len(student_tokenizer), args.seq_len, args.seed).to(device)

    def student_run(name, loss_step, batches):
        student = fresh_student()
        optimizer = adamw(student, args.lr)
        return Run(name, student, loss_step, batches, optimizer, warmup_then_constant(optimizer, 30),
                   eval_windows=windows, eval_batch=args.batch_size, eval_every=max(1, args.steps // 6))

    # One untimed step of each loss first, on held-out text: one-time costs (kernels loaded, first-call allocations)
    # are charged to neither student's training time.
    texts = student_tokenizer.batch_decode(windows)
    probe, warm = fresh_student(), to_device(collator([{"text": text} for text in texts[:args.batch_size]]), device)
    for loss_step in (fused, plain_step):
        loss_step(probe, warm).backward()
    distilled = student_run("student, cross-tokenizer distilled (hybrid)", fused, shared.reader())
    plain = student_run("student, plain cross-entropy", plain_step, shared.reader(student_only=True))
    with progress_bar(console) as progress:
        train_side_by_side([distilled], plain, args.steps, progress)
    batch = shared.made[0]
    # Measured after training, so that the probe's heap trimming (kdfast.memory) cannot slow the training steps.
    with console.status("per-step cost: fused vs logits-form cross-vocabulary loss"):
        costs = step_costs(fresh_student(), to_device(batch, device),
                           {"kdfast fused (linear_cross_vocab_distill_loss)": fused,
                            "logits form (full logits, cross_vocab_distill_loss)": logits_step(teacher, vocab_map,
                                                                                               settings),
                            "plain cross-entropy": plain_step}, rounds=5)
    alignment = batch["alignment"]
    facts = {"collate_ms": collate_ms(shared), "groups_per_token": alignment.groups / int(
        batch["labels"][:, 1:].ne(-100).sum()), "merged": (alignment.student.extra_rows.numel(),
                                                            alignment.teacher.extra_rows.numel(), alignment.groups)}
    teacher_scores = text_scores(teacher, teacher_tokenizer, texts, args.batch_size)
    student_bytes = sum(len(student_tokenizer.decode(window[1:]).encode()) for window in windows.tolist())
    rows = table(teacher, teacher_record, teacher_scores, distilled, plain, student_bytes / windows[:, 1:].numel(),
                 f"BPE {len(student_tokenizer)}",
                 f"{'checkpoint' if args.teacher else 'BPE'} {len(teacher_tokenizer)}")
    lines = findings(rows, distilled.result, plain.result, costs, facts, vocab_map, args,
                     time.perf_counter() - started, str(device))
    write_report(rows, lines, args, console, str(device))
    return 0


def table(teacher, teacher_record, teacher_scores, distilled, plain, student_bytes_per_token, student_tokenizer,
          teacher_tokenizer) -> list[dict]:
    """One row per model state: held-out loss and perplexity per the model's own token (the students share theirs),
    and bits per byte of the same held-out text."""

    def row(name, tokenizer, params, steps, seconds, loss, nats_per_byte):
        return dict(model=name, tokenizer=tokenizer, parameters=params, steps=steps, train_seconds=seconds,
                    held_out_loss=round(loss, 4), perplexity=round(math.exp(loss), 2),
                    bits_per_byte=round(nats_per_byte / math.log(2), 4))

    def student(name, state):
        step, seconds, loss = state
        return row(name, student_tokenizer, parameter_count(distilled.model), step, round(seconds, 1), loss,
                   loss / student_bytes_per_token)

    nats, tokens, size = teacher_scores
    result = distilled.result
    return [row("teacher (cached)" if "cached_at" in teacher_record else "teacher", teacher_tokenizer,
                parameter_count(teacher), teacher_record.get("steps", "checkpoint"),
                teacher_record.get("train_seconds", ""), nats / tokens, nats / size),
            student("student, plain CE (equal steps)", plain.result.marks["equal steps"]),
            student(result.name, (result.steps, result.seconds, result.curve[-1][2])),
            student("student, plain CE (equal wall time)", plain.result.marks[f"equal wall time: {result.name}"])]


def findings(rows, distilled, plain, costs, facts, vocab_map, args, seconds, device) -> list[str]:
    by_name = {row["model"]: row for row in rows}
    mine = by_name[distilled.name]["perplexity"]

    def compare(label, other):
        theirs = by_name[other]["perplexity"]
        change = mine / theirs - 1
        return (f"{label}: the cross-tokenizer student's perplexity is {abs(change):.1%} "
                f"{'lower' if change < 0 else 'higher'} than plain CE's ({mine:.2f} vs {theirs:.2f} per student token)")

    wall = by_name["student, plain CE (equal wall time)"]
    lines = [compare(f"Equal steps ({args.steps})", "student, plain CE (equal steps)"),
             compare(f"Equal wall time ({distilled.seconds:.0f} s of training; plain CE took {wall['steps']} steps)",
                     "student, plain CE (equal wall time)"),
             f"Training step (mean over the run, including making its batches): cross-tokenizer "
             f"{distilled.seconds / distilled.steps * 1e3:.0f} ms, plain CE "
             f"{plain.marks['equal steps'][1] / args.steps * 1e3:.0f} ms"]
    parts = ", ".join(f"{name} {ms * 1e3:.0f} ms and {peak / 2**20:.0f} MiB extra peak"
                      for name, (ms, peak) in costs.items())
    lines.append(f"Per step, student forward + backward with the teacher's forward (median of 5): {parts}")
    student_merged, teacher_merged, groups = facts["merged"]
    lines.append(f"Tokenising a batch with both tokenizers and aligning: {facts['collate_ms']:.0f} ms; "
                 f"{facts['groups_per_token']:.2f} aligned groups per student label token (tokens after the first "
                 f"group; {student_merged} student and {teacher_merged} teacher tokens merged into {groups} groups "
                 f"in the first batch); {vocab_map.matched} tokens shared of {vocab_map.student_size} (student) and "
                 f"{vocab_map.teacher_size} (teacher)")
    lines.append(f"Whole run: {seconds:.0f} s on {device}")
    return lines


def write_report(rows: list[dict], lines: list[str], args, console, device: str) -> None:
    from rich.table import Table

    shown = Table(title=f"held-out loss at {args.steps} steps (perplexity per each model's own token)")
    for column in rows[0]:
        shown.add_column(column, justify="left" if column in ("model", "tokenizer") else "right")
    for row in rows:
        shown.add_row(*(str(value) for value in row.values()))
    console.print(shown)
    for line in lines:
        console.print(f"- {line}")
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"distill_cross_tokenizer_{report.device_tag(device)}"
    stem.with_suffix(".md").write_text(
        f"# kdfast distill --cross-tokenizer\n\n{args.steps} student steps (batch {args.batch_size} x "
        f"{args.seq_len + 1} student tokens), loss hybrid, {args.divergence}, temperature {args.temperature}, "
        f"kd_weight {args.kd_weight}, ce_weight {args.ce_weight}.\n\n"
        + report.csv_and_markdown(rows, stem.with_suffix(".csv")) + "\n" + "".join(f"- {line}\n" for line in lines))
    console.print(f"wrote {stem}.csv and {stem}.md")
