"""`kdfast teacher-cache convert`: another tool's sparse teacher as the rows kdfast trains on, or kdfast's as axolotl's.

Sources (--from): axolotl (target_token_ids / target_logprobs / target_mask, or its raw per-position `logprobs` lists
beside input_ids), distillkit (raw token_ids / top_values, or compressed rows with the compression config they were
written with), vllm-jsonl (one /v1/completions response per line), kdfast (a `kdfast teacher-cache` folder, or a
dataset with teacher_ids / teacher_logprobs). A dataset is a `datasets` folder (save_to_disk), a .parquet file or a
folder of them, or a .jsonl / .json file.

Targets (--to): kdfast (input_ids, teacher_ids, teacher_logprobs and the source's labels: the rows
SparseTeacherCollator and DistillationTrainer read) or axolotl (its columns, rows renormalised as its loss expects).
Written as a datasets folder, or a .parquet / .jsonl file by the suffix of --out. Log-probs are kept as stored: train
on them with tail="renormalize" and teacher_temperature = the temperature they were made at (reported)."""

from __future__ import annotations

import argparse
from collections import Counter
from functools import partial
from itertools import chain, islice
from pathlib import Path

DESCRIPTION = "read the sparse teachers of axolotl, DistillKit and vLLM as kdfast's training rows, or write axolotl's"
SOURCES = ("axolotl", "distillkit", "vllm-jsonl", "kdfast")
TARGETS = ("kdfast", "axolotl")
SAMPLED_FOR_K = 64  # records whose rows decide k when it is not given (the most common width)


def convert(source, source_format: str, out, target_format: str = "kdfast", *, vocab_size: int | None = None,
            top_k: int | None = None, axolotl_rows: str = "next", distillkit_config=None,
            teacher_temperature: float | None = None, kd_temperature: float | None = None, normalize: bool = True,
            overwrite: bool = False) -> dict:
    """Convert `source` (in `source_format`, one of SOURCES) to `out` (in `target_format`, one of TARGETS); returns
    the stats: examples, tokens, rows with targets, k, rows dropped (targets for a token outside their example), and
    the temperature the log-probs are at (`teacher_temperature`: a kdfast cache's own, else as given, else 1).
    `vocab_size`: ids must lie below it (default: a kdfast cache's). `top_k`: k of vLLM's and axolotl's raw lists
    (default: their most common width). `axolotl_rows`: "next" (axolotl row t is the distribution of token t + 1, as
    its trainer reads rows) or "same". `distillkit_config`: the compression config of DistillKit's compressed rows
    (default: compression_config.yaml beside them). To axolotl: rows re-tempered from `teacher_temperature` to
    `kd_temperature` (default: the same) and renormalised, unless `normalize` is False."""
    from kdfast.teacher_cache import axolotl_format, row_files

    source, out = Path(source), Path(out)
    if source_format not in SOURCES or target_format not in TARGETS:
        raise ValueError(f"convert --from one of {SOURCES} --to one of {TARGETS}, got {source_format!r} to "
                         f"{target_format!r}")
    if not source.exists():
        raise ValueError(f"{source}: no such file or folder")
    if out.exists() and not overwrite:
        raise ValueError(f"{out} exists: pass overwrite=True (--overwrite) to replace it")
    if out.resolve() == source.resolve():
        raise ValueError("out must differ from the source")
    stats = Counter()
    cache = _teacher_cache(source) if source_format == "kdfast" else None
    if cache is not None:
        teacher_temperature = cache.settings.temperature if teacher_temperature is None else teacher_temperature
        vocab_size = cache.settings.vocab_size if vocab_size is None else vocab_size
    teacher_temperature = 1.0 if teacher_temperature is None else float(teacher_temperature)
    if cache is not None:
        examples = _cache_examples(cache)
    else:
        examples = _read(source, source_format, stats, vocab_size=vocab_size, top_k=top_k, axolotl_rows=axolotl_rows,
                         distillkit_config=distillkit_config)
    rows = _counted(examples, stats)
    if target_format == "axolotl":
        scale = teacher_temperature / (kd_temperature or teacher_temperature)
        rows = (axolotl_format.write_example(row["input_ids"], row["teacher_ids"], row["teacher_logprobs"],
                                             row.get("labels"), rows=axolotl_rows, normalize=normalize, scale=scale)
                for row in rows)
    row_files.write(rows, out, overwrite)
    return {"from": source_format, "to": target_format, "out": str(out), "examples": stats["examples"],
            "tokens": stats["tokens"], "rows_with_targets": stats["rows_with_targets"], "k": stats["k"],
            "rows_dropped": stats["rows_dropped"], "teacher_temperature": teacher_temperature}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", type=Path, help="a datasets folder, .parquet file (or folder of them), .jsonl/.json "
                                                  "file, or a `kdfast teacher-cache` folder")
    parser.add_argument("--from", dest="source_format", choices=SOURCES, required=True, help="the source's format")
    parser.add_argument("--to", dest="target_format", choices=TARGETS, default="kdfast", help="default kdfast")
    parser.add_argument("--out", type=Path, required=True,
                        help="a datasets folder, or a .parquet / .jsonl file by its suffix")
    parser.add_argument("--vocab-size", type=int, help="refuse ids at or past it (default: a kdfast cache's)")
    parser.add_argument("--top-k", type=int, help="ids kept per row from vLLM's prompt_logprobs and axolotl's raw "
                                                  f"lists (default: their most common width in the first "
                                                  f"{SAMPLED_FOR_K} records)")
    parser.add_argument("--distillkit-config", type=Path,
                        help="the compression config of DistillKit's compressed rows (default: the "
                             "compression_config.yaml beside them)")
    parser.add_argument("--axolotl-rows", choices=("next", "same"), default="next",
                        help="next: axolotl row t is the distribution of token t + 1, as its trainer reads it "
                             "(default); same: of token t, as in datasets for its first KD trainer")
    parser.add_argument("--teacher-temperature", type=float,
                        help="the temperature the source's log-probs were made at (default: a kdfast cache's, else 1)")
    parser.add_argument("--kd-temperature", type=float,
                        help="--to axolotl: axolotl's kd_temperature, to which rows are re-tempered (default: the "
                             "teacher temperature)")
    parser.add_argument("--raw-logprobs", action="store_true",
                        help="--to axolotl: store the log-probs as they are, not renormalised per row")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")


def check_args(parser: argparse.ArgumentParser, args) -> None:
    for name in ("vocab_size", "top_k"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    for name in ("teacher_temperature", "kd_temperature"):
        value = getattr(args, name)
        if value is not None and not value > 0:
            parser.error(f"--{name.replace('_', '-')} must be > 0, got {value}")
    if not args.source.exists():
        parser.error(f"{args.source}: no such file or folder")
    if args.out.exists() and not args.overwrite:
        parser.error(f"--out {args.out} exists (--overwrite replaces it)")
    if args.distillkit_config is not None and args.source_format != "distillkit":
        parser.error("--distillkit-config goes with --from distillkit")
    if args.target_format != "axolotl" and (args.raw_logprobs or args.kd_temperature is not None):
        parser.error("--raw-logprobs and --kd-temperature go with --to axolotl")
    if args.raw_logprobs and args.kd_temperature not in (None, args.teacher_temperature):
        parser.error("--raw-logprobs keeps the log-probs as they are: it cannot re-temper them (--kd-temperature)")


def run(args) -> int:
    try:
        stats = convert(args.source, args.source_format, args.out, args.target_format, vocab_size=args.vocab_size,
                        top_k=args.top_k, axolotl_rows=args.axolotl_rows, distillkit_config=args.distillkit_config,
                        teacher_temperature=args.teacher_temperature, kd_temperature=args.kd_temperature,
                        normalize=not args.raw_logprobs, overwrite=args.overwrite)
    except ValueError as error:  # the input's fault, named by column and record: a line, not a traceback
        raise SystemExit(f"kdfast teacher-cache convert: error: {error}") from None
    print(f"{stats['examples']} examples ({stats['tokens']} tokens, {stats['rows_with_targets']} with teacher rows, "
          f"k={stats['k']}) from {args.source_format} to {args.target_format} in {stats['out']}")
    if stats["rows_dropped"]:
        print(f"{stats['rows_dropped']} rows dropped: their targets describe a token outside their example")
    if args.target_format == "kdfast":
        print(f"train with tail='renormalize', teacher_temperature={stats['teacher_temperature']} (the log-probs are "
              "stored as the source holds them)")
    return 0


def _read(source: Path, source_format: str, stats: Counter, **settings):
    """kdfast examples of a dataset or JSONL source, each record read by its format's reader."""
    from kdfast.teacher_cache import row_files

    records = row_files.records(source)
    first = list(islice(records, SAMPLED_FOR_K))
    if not first:
        raise ValueError(f"{source} holds no records")
    read = _reader(source, source_format, first, **settings)
    for index, record in enumerate(chain(first, records)):
        for rows, dropped in read(record, f"{source.name} record {index}"):
            stats["rows_dropped"] += dropped
            yield rows


def _reader(source: Path, source_format: str, first: list, *, vocab_size, top_k, axolotl_rows, distillkit_config):
    """A function of (record, where) -> [(kdfast rows, rows dropped)] (a vLLM line may answer several prompts); k
    and the DistillKit config are settled here, from the first records."""
    from kdfast.teacher_cache import axolotl_format, distillkit_codec, peer_formats

    if source_format == "vllm-jsonl":
        widths = sum((peer_formats.vllm_widths(choice.get("prompt_logprobs") or [None])
                      for record in first for choice, _ in _choices(record, "the first records")), Counter())
        k = top_k or peer_formats.most_common(widths, "prompt_logprobs")

        def read(record, where):
            return [peer_formats.vllm_example(choice, ids, k=k, vocab_size=vocab_size, where=f"{where} choice {index}")
                    for index, (choice, ids) in enumerate(_choices(record, where))]
        return read
    if source_format == "axolotl" and "target_token_ids" not in first[0] and axolotl_format.LEGACY_COLUMN in first[0]:
        widths = sum((axolotl_format.legacy_width(record[axolotl_format.LEGACY_COLUMN]) for record in first), Counter())
        k = top_k or peer_formats.most_common(widths, "logprobs lists")
        return partial(_one, axolotl_format.read_legacy_example, k=k, vocab_size=vocab_size)
    if source_format == "axolotl":
        return partial(_one, axolotl_format.read_example, rows=axolotl_rows, vocab_size=vocab_size)
    if source_format == "distillkit":
        config = None
        if set(peer_formats.DISTILLKIT_COMPRESSED_COLUMNS) & set(first[0]):
            config = distillkit_codec.load_config(distillkit_config or (source if source.is_dir() else source.parent))
        return partial(_one, peer_formats.distillkit_example, config=config, vocab_size=vocab_size)
    return partial(_one, peer_formats.kdfast_example, vocab_size=vocab_size)


def _one(reader, record: dict, where: str, **settings) -> list:
    return [reader(record, where=where, **settings)]


def _choices(record: dict, where: str):
    """(choice, prompt ids) of a JSONL line: a vLLM /v1/completions response (prompt ids in each choice's
    prompt_token_ids, as vLLM returns them with return_token_ids, or a top-level prompt_token_ids), or
    {"prompt": ids (a list of them for a batched request), "response": the response}."""
    response = record.get("response", record)
    choices = response.get("choices") if isinstance(response, dict) else None
    if not choices:
        raise ValueError(f"{where}: no choices: a line is a vLLM /v1/completions response or "
                         "{\"prompt\": [ids], \"response\": {...}}")
    prompt = record.get("prompt", response.get("prompt_token_ids"))
    prompt = prompt if isinstance(prompt, list) else None  # a text prompt does not say its ids
    for index, choice in enumerate(choices):
        ids = choice.get("prompt_token_ids")
        if ids is None and prompt is not None:
            ids = prompt[index] if prompt and isinstance(prompt[0], list) else prompt
        if ids is None:
            raise ValueError(f"{where}: choice {index} has no prompt token ids (choices[].prompt_token_ids from vLLM's "
                             "return_token_ids, a top-level prompt_token_ids, or a line {\"prompt\": [ids], "
                             "\"response\": ...})")
        yield choice, ids


def _teacher_cache(source: Path):
    if not (source / "manifest.json").is_file():
        return None
    from kdfast.teacher_cache.reader import TeacherCache

    return TeacherCache(source)


def _cache_examples(cache):
    step = cache.settings.windows_per_shard  # whole shards at a time, as they are stored
    for start in range(0, len(cache), step):
        batch = cache.batch(start, min(start + step, len(cache)))
        for index in range(batch["input_ids"].shape[0]):
            yield {name: values[index] for name, values in batch.items()}


def _counted(rows, stats: Counter):
    for row in rows:
        stats["examples"] += 1
        stats["tokens"] += int(row["input_ids"].numel())
        stats["rows_with_targets"] += int((row["teacher_ids"] >= 0).any(-1).sum())
        stats["k"] = max(stats["k"], int(row["teacher_ids"].shape[-1]))
        yield row
