"""Training and measuring for the demo: identical batches for every run, the plain cross-entropy step, the fused
kdfast distillation step (and the eager one it replaces), held-out evaluation, and a loop bounded by steps or
by wall time with a progress bar."""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

import kdfast
from kdfast.memory import extra_peak_bytes
from kdfast.reference import distill_loss_reference


class Batches:
    """Random windows of `seq_len + 1` tokens; the same seed gives every run the same sequence of batches."""

    def __init__(self, tokens: torch.Tensor, batch_size: int, seq_len: int, seed: int):
        if tokens.numel() <= seq_len + 1:
            raise SystemExit(f"the training text has {tokens.numel()} tokens: too few for --seq-len {seq_len}")
        self.tokens, self.batch_size, self.seq_len = tokens, batch_size, seq_len
        self.generator = torch.Generator().manual_seed(seed)

    def __next__(self) -> torch.Tensor:
        return self.windows(self.next_starts())

    def next_starts(self) -> torch.Tensor:
        return torch.randint(0, self.tokens.numel() - self.seq_len - 1, (self.batch_size,), generator=self.generator)

    def windows(self, starts: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.tokens[s:s + self.seq_len + 1] for s in starts.tolist()])


def held_out_windows(tokens: torch.Tensor, seq_len: int, count: int) -> torch.Tensor:
    """Up to `count` windows spread evenly over the held-out stream."""
    available = (tokens.numel() - 1) // seq_len
    if available < 1:
        raise SystemExit(f"the held-out text has {tokens.numel()} tokens: too few for --seq-len {seq_len}")
    picks = torch.linspace(0, available - 1, min(count, available)).long()
    return torch.stack([tokens[i * seq_len:i * seq_len + seq_len + 1] for i in picks.tolist()])


@torch.no_grad()
def held_out_loss(model, windows: torch.Tensor, batch_size: int) -> float:
    """Mean next-token cross-entropy (nats) over every window's tokens."""
    was_training = model.training
    model.eval()
    total = 0.0
    for batch in windows.to(model.device).split(batch_size):
        logits = model(input_ids=batch[:, :-1]).logits
        total += F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten(), reduction="sum").item()
    model.train(was_training)
    return total / (windows.shape[0] * (windows.shape[1] - 1))


def cross_entropy_step(model, batch):
    return model(input_ids=batch, labels=batch).loss


def fused_distill_step(teacher, settings: dict, vocab: int):
    """The loss of a distilled student: kdfast's fused linear loss over both models' last hidden states (LM-head
    rows past the tokenizer's `vocab` are padding and are left out)."""

    def step(model, batch):
        student_hidden = model.get_decoder()(input_ids=batch).last_hidden_state[:, :-1]
        with torch.no_grad():
            teacher_hidden = teacher.get_decoder()(input_ids=batch).last_hidden_state[:, :-1]
        return kdfast.linear_distill_loss(student_hidden, model.get_output_embeddings().weight[:vocab],
                                          teacher_hidden, teacher.get_output_embeddings().weight[:vocab],
                                          batch[:, 1:], **settings)

    return step


def eager_distill_step(teacher, settings: dict, vocab: int):
    """The same loss as plain PyTorch computes it: both models' full logits, then the float32 formula."""

    def step(model, batch):
        student_logits = model(input_ids=batch).logits[:, :-1, :vocab]
        with torch.no_grad():
            teacher_logits = teacher(input_ids=batch).logits[:, :-1, :vocab]
        return distill_loss_reference(student_logits, teacher_logits, batch[:, 1:], dtype=None, **settings)

    return step


def step_costs(model, batch, steps: dict, rounds: int) -> dict:
    """name -> (median seconds, extra peak bytes) of one forward + backward, rounds interleaved."""
    def run(step):
        model.zero_grad(set_to_none=True)
        step(model, batch).backward()

    times = {name: [] for name in steps}
    for step in steps.values():
        run(step)  # warm-up: kernel load, allocator
    for _ in range(rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            run(step)
            times[name].append(time.perf_counter() - start)
    peaks = {name: extra_peak_bytes(lambda step=step: run(step), model.device) for name, step in steps.items()}
    model.zero_grad(set_to_none=True)
    return {name: (statistics.median(times[name]), peaks[name]) for name in steps}


@dataclass
class RunResult:
    name: str
    steps: int = 0
    seconds: float = 0.0  # training time only: evaluations are not counted
    curve: list = field(default_factory=list)  # (step, seconds, held-out loss)
    marks: dict = field(default_factory=dict)  # label -> (step, seconds, held-out loss)


def warmup_then_constant(optimizer, warmup_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup_steps))


def warmup_then_cosine(optimizer, warmup_steps: int, total_steps: int, floor: float = 0.1):
    def factor(step):
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class Run:
    """One model's training: a step at a time, timed (evaluations are not counted), evaluated every
    `eval_every` steps on the held-out windows."""

    def __init__(self, name, model, loss_step, batches: Batches, optimizer, scheduler, *, eval_windows,
                 eval_batch: int, eval_every: int, autocast_dtype=None):
        self.result = RunResult(name)
        self.model, self.loss_step, self.batches = model, loss_step, batches
        self.optimizer, self.scheduler = optimizer, scheduler
        self.eval_windows, self.eval_batch, self.eval_every = eval_windows, eval_batch, eval_every
        self.autocast_dtype = autocast_dtype
        model.train()
        self.evaluate()

    def evaluate(self) -> float:
        loss = held_out_loss(self.model, self.eval_windows, self.eval_batch)
        self.result.curve.append((self.result.steps, self.result.seconds, loss))
        return loss

    def step(self) -> None:
        model, result = self.model, self.result
        start = time.perf_counter()  # fetching the batch counts: for a cached teacher it is a read from disk
        batch = to_device(next(self.batches), model.device)
        with torch.autocast(model.device.type, self.autocast_dtype, enabled=self.autocast_dtype is not None):
            loss = self.loss_step(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if model.device.type == "cuda":
            torch.cuda.synchronize(model.device)
        result.seconds += time.perf_counter() - start
        result.steps += 1
        if result.steps % self.eval_every == 0:
            self.evaluate()

    def finish(self) -> RunResult:
        if self.result.curve[-1][0] != self.result.steps:
            self.evaluate()
        return self.result


def train_steps(run: Run, steps: int, progress) -> RunResult:
    task = progress.add_task(run.result.name, total=steps)
    for done in range(1, steps + 1):
        run.step()
        progress.update(task, completed=done)
    return run.finish()


def train_side_by_side(students: list, plain: Run, steps: int, progress) -> None:
    """The students and the plain-CE run step in turn on identical batches, so a busy moment on a shared machine
    slows all alike; then the plain run goes on alone until it has trained as long as each student (equal wall
    time), its state marked "equal steps" at `steps` and "equal wall time: <student>" at each student's time."""
    runs = [*students, plain]
    tasks = {run: progress.add_task(run.result.name, total=steps) for run in runs}
    for done in range(1, steps + 1):
        for run in runs:
            run.step()
            progress.update(tasks[run], completed=done)
    if plain.result.curve[-1][0] != steps:
        plain.evaluate()
    plain.result.marks["equal steps"] = plain.result.curve[-1]
    budgets = sorted((run.finish().seconds, run.result.name) for run in students)
    # A student that trained no longer than plain CE's first `steps` is compared with that state: plain CE then had
    # at least the student's time.
    for budget, name in budgets:
        progress.update(tasks[plain], total=budget, completed=min(plain.result.seconds, budget))
        while plain.result.seconds < budget:
            plain.step()
            progress.update(tasks[plain], completed=min(plain.result.seconds, budget))
        if plain.result.curve[-1][0] != plain.result.steps:
            plain.evaluate()
        plain.result.marks[f"equal wall time: {name}"] = plain.result.curve[-1]
    plain.finish()


def to_device(batch, device):
    if isinstance(batch, dict):
        return {name: value.to(device) for name, value in batch.items()}
    return batch.to(device)
