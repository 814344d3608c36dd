"""`kdfast distill`: distils a small LLaMA-style student from a stronger teacher on the CPU, next to the same
student trained with plain cross-entropy on identical batches, and reports what this run measured:

- held-out perplexity of the teacher, the plain-CE student and the distilled student at equal steps, and of the
  plain-CE student given the distilled student's training time (equal wall time);
- with --teacher-cache, students trained on the teacher's stored top-k log-probs (k = 32, 8, 64; a teacher cache
  over the students' own batches), the first beside the others and against plain CE at its own wall time;
- the per-step cost and extra peak memory of kdfast's fused loss vs the same loss computed eagerly;
- loss curves (PNG), a Markdown table and a CSV;
- with --teachers N, a teacher per domain of the text instead, and students of their mixture, of each window routed
  to its domain's teacher, of each one alone and of plain CE at equal steps, each model's perplexity on each domain
  (kdfast.demo.several_teachers);
- with --cross-tokenizer, students of another tokenizer than the teacher's: one distilled across the two
  vocabularies, one of plain CE, at equal steps and equal wall time (kdfast.demo.cross_tokenizer).

Default data: the Python standard library's sources, with a BPE tokenizer trained on them. The teacher is
trained on the first run and cached, keyed by its settings and the corpus. `--teacher DIR --student DIR
--data FILE` use checkpoints and text on disk instead (nothing is fetched).
"""

from __future__ import annotations

import functools
import time

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from kdfast.demo import report
from kdfast.demo.arguments import parse_args
from kdfast.demo.cached_teacher import (
    CachedBatches,
    build_caches,
    cached_distill_step,
    describe,
    top_k_mass,
    training_windows,
)
from kdfast.demo.corpus import load_corpus
from kdfast.demo.models import (
    STUDENT_SIZE,
    TEACHER_SIZE,
    cached_teacher,
    load_checkpoint,
    new_model,
    parameter_count,
    save_teacher,
    size_settings,
    teacher_cache_path,
)
from kdfast.demo.training import (
    Batches,
    Run,
    cross_entropy_step,
    eager_distill_step,
    fused_distill_step,
    held_out_loss,
    held_out_windows,
    step_costs,
    train_side_by_side,
    train_steps,
    warmup_then_constant,
    warmup_then_cosine,
)


def progress_bar(console):
    return Progress(TextColumn("{task.description:<34}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                    TimeElapsedColumn(), console=console)


def adamw(model, lr):
    return torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)


def teacher_autocast(device: torch.device):
    """bfloat16 autocast for the teacher's training where the hardware runs it (a GPU, a CPU with AVX512-BF16 or
    AMX), else None (float32): without them torch's CPU bf16 matmul is emulated, about 100x slower than float32
    (measured on an AVX2 AMD Zen 3: [2048, 512] x [512, 2048] in 11.1 s against 0.11 s; the demo's smoke test was
    still training its teacher there after 8 CPU minutes, where in float32 the teacher took 81 s)."""
    if device.type != "cpu":
        return torch.bfloat16
    supported = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return torch.bfloat16 if supported is not None and supported() else None


def get_teacher(args, corpus, device, console, progress):
    if args.teacher:
        return load_checkpoint(args.teacher).to(device), {"source": str(args.teacher)}
    autocast = teacher_autocast(device)
    settings = {"size": size_settings(TEACHER_SIZE), "steps": args.teacher_steps, "corpus": corpus.fingerprint,
                "vocab": len(corpus.tokenizer), "seq_len": args.seq_len, "batch": args.batch_size,
                "lr": 1e-3, "seed": args.seed + 1000, "autocast": str(autocast).removeprefix("torch.")}
    path = teacher_cache_path(args.cache_dir, settings)
    cached = cached_teacher(path)
    if cached is not None:
        console.print(f"teacher: cached at {path}")
        return cached[0].to(device), {**cached[1], "cached_at": str(path)}
    console.print(f"teacher: training {args.teacher_steps} steps (once; cached at {path})")
    teacher = new_model(TEACHER_SIZE, len(corpus.tokenizer), args.seq_len, settings["seed"]).to(device)
    optimizer = adamw(teacher, settings["lr"])
    run = Run("teacher", teacher, cross_entropy_step, Batches(corpus.train, args.batch_size, args.seq_len,
                                                               settings["seed"]), optimizer,
              warmup_then_cosine(optimizer, min(100, args.teacher_steps // 10 + 1), args.teacher_steps),
              eval_windows=held_out_windows(corpus.held_out, args.seq_len, 32), eval_batch=args.batch_size,
              eval_every=max(1, args.teacher_steps // 4), autocast_dtype=autocast)
    run = train_steps(run, args.teacher_steps, progress)
    record = {"source": "trained by kdfast distill", "steps": run.steps, "train_seconds": round(run.seconds, 1)}
    save_teacher(teacher, path, settings, record)
    return teacher, record


def cached_students(args, teacher, corpus, settings, vocab, student_run, console):
    """With --teacher-cache: a student per --cache-k on the teacher's stored top-k (tail="bucket") and one per
    --cache-samples on n samples from it (tail="renormalize": the unbiased sampled estimator), over the very batches
    the other students see (each cache built once, or reused); and each cache's size, build rate and top-k mass."""
    if not args.teacher_cache:
        return [], {}
    windows = training_windows(Batches(corpus.train, args.batch_size, args.seq_len, args.seed), args.steps)
    kinds = [("top_k", k) for k in args.cache_k] + [("sample", n) for n in args.cache_samples]
    caches = build_caches(teacher, windows, corpus.tokenizer, kinds, settings["temperature"], args.cache_dir,
                          args.batch_size, console)
    runs = []
    for (method, k), cache in caches.items():
        tail = "bucket" if method == "top_k" else "renormalize"
        runs.append(student_run(f"student, cached teacher {describe(method, k)} ({tail})",
                                cached_distill_step(settings, vocab, tail), CachedBatches(cache, args.batch_size)))
    stats = {describe(method, k): {**cache.stats, "mass": top_k_mass(cache) if method == "top_k" else None}
             for (method, k), cache in caches.items()}
    return runs, stats


def main(argv=None):
    return run(parse_args(argv))


def run_several_teachers(args, corpus, device, console, started):
    """--teachers N: a teacher per domain, and students of their mixture, of each window routed to its domain's
    teacher, of each alone, and of plain CE."""
    from kdfast.demo import several_teachers

    parts = several_teachers.domains(corpus, args.teachers)
    teachers = []
    with progress_bar(console) as progress:
        for part in parts:
            teacher, _ = get_teacher(args, part, device, console, progress)
            teachers.append(teacher.eval().requires_grad_(False))
    vocab = len(corpus.tokenizer)
    settings = dict(divergence=args.divergence, temperature=args.temperature, kd_weight=args.kd_weight,
                    ce_weight=args.ce_weight)
    windows = held_out_windows(corpus.held_out, args.seq_len, args.eval_windows)

    def student_run(name, loss_step, batches=Batches):
        student = new_model(STUDENT_SIZE, teachers[0].get_output_embeddings().weight.shape[0], args.seq_len,
                            args.seed).to(device)
        optimizer = adamw(student, args.lr)
        return Run(name, student, loss_step, batches(corpus.train, args.batch_size, args.seq_len, args.seed),
                   optimizer, warmup_then_constant(optimizer, 30), eval_windows=windows, eval_batch=args.batch_size,
                   eval_every=max(1, args.steps // 3))

    students = [student_run("student, the teachers' mixture", several_teachers.mixture_step(teachers, settings,
                                                                                             vocab)),
                student_run("student, each window routed to its domain's teacher",
                            several_teachers.routed_step(teachers, settings, vocab),
                            functools.partial(several_teachers.DomainBatches, count=len(teachers)))]
    students += [student_run(f"student, teacher {index + 1} alone", fused_distill_step(teacher, settings, vocab))
                 for index, teacher in enumerate(teachers)]
    plain = student_run("student, plain cross-entropy", cross_entropy_step)
    with progress_bar(console) as progress:
        for run in [*students, plain]:
            train_steps(run, args.steps, progress)
    models = {f"teacher {index + 1} (its domain's text)": teacher for index, teacher in enumerate(teachers)}
    models.update({run.result.name: run.model for run in [*students, plain]})
    rows = several_teachers.perplexities(models, parts, args)
    several_teachers.write_report(rows, args, console, time.perf_counter() - started, str(device))
    return 0


def run(args):
    console = Console()
    device = torch.device(args.device)
    started = time.perf_counter()
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    with console.status("corpus and tokenizer"):
        corpus = load_corpus(args.data, args.vocab_size, args.teacher, args.cache_dir)
    console.print(f"corpus: {corpus.description}; {corpus.train.numel() / 1e6:.2f} M training tokens, "
                  f"{corpus.held_out.numel() / 1e3:.0f} k held-out tokens, vocabulary {len(corpus.tokenizer)}")
    if args.teachers > 1:
        return run_several_teachers(args, corpus, device, console, started)
    if args.cross_tokenizer:
        from kdfast.demo import cross_tokenizer

        return cross_tokenizer.run(args, corpus, device, console, started)
    windows = held_out_windows(corpus.held_out, args.seq_len, args.eval_windows)
    with progress_bar(console) as progress:
        teacher, teacher_record = get_teacher(args, corpus, device, console, progress)
    teacher.eval().requires_grad_(False)
    vocab = len(corpus.tokenizer)
    if teacher.get_output_embeddings().weight.shape[0] < vocab:
        raise SystemExit(f"the teacher's LM head has fewer rows than the tokenizer's {vocab} tokens")

    def fresh_student():
        if args.student:
            return load_checkpoint(args.student).to(device)
        return new_model(STUDENT_SIZE, teacher.get_output_embeddings().weight.shape[0], args.seq_len,
                         args.seed).to(device)

    settings = dict(divergence=args.divergence, temperature=args.temperature, kd_weight=args.kd_weight,
                    ce_weight=args.ce_weight)
    fused, eager = fused_distill_step(teacher, settings, vocab), eager_distill_step(teacher, settings, vocab)

    def student_run(name, loss_step, batches=None):
        student = fresh_student()
        optimizer = adamw(student, args.lr)
        batches = batches or Batches(corpus.train, args.batch_size, args.seq_len, args.seed)
        return Run(name, student, loss_step, batches, optimizer, warmup_then_constant(optimizer, 30),
                   eval_windows=windows, eval_batch=args.batch_size, eval_every=max(1, args.steps // 6))

    distilled = student_run("student, distilled (kdfast)", fused)
    plain = student_run("student, plain cross-entropy", cross_entropy_step)
    cached, cache_stats = cached_students(args, teacher, corpus, settings, vocab, student_run, console)
    main_cached = cached[:1]  # steps in turn with the others; the other k at equal steps afterwards
    with progress_bar(console) as progress:
        train_side_by_side([distilled, *main_cached], plain, args.steps, progress)
        for run in cached[1:]:
            train_steps(run, args.steps, progress)
    runs = {"distilled": distilled.result, "plain": plain.result, "cached": [run.result for run in cached]}
    student = plain.model
    # Measured after training, so that the probe's heap trimming (kdfast.memory) cannot slow the training steps.
    with console.status("per-step cost: fused vs eager distillation loss"):
        costs = step_costs(fresh_student(), next(Batches(corpus.train, args.batch_size, args.seq_len, 1)).to(device),
                           {"kdfast fused loss": fused, "eager PyTorch loss": eager}, rounds=5)
    teacher_loss = held_out_loss(teacher, windows, args.batch_size)
    summary = report.Summary(
        corpus=corpus.description, device=str(device), settings=settings, steps=args.steps,
        eval_tokens=windows.shape[0] * args.seq_len, teacher_loss=teacher_loss, teacher_record=teacher_record,
        teacher_params=parameter_count(teacher), student_params=parameter_count(student), runs=runs, costs=costs,
        cache_stats=cache_stats, total_seconds=time.perf_counter() - started)
    report.print_and_write(summary, console, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
