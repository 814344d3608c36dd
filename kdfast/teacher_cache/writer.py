"""Builds a teacher cache: the teacher runs over token windows once and each shard of windows is written with its
top-k (or sampled) next-token ids and log-probs. Resumable: a rerun with the same settings keeps every shard the
manifest lists whose bytes still match their sha256 and computes only the rest, so `kill -9` at any moment costs at
most the shard in progress. Shards are deterministic (sampling seeds itself per shard), so a recomputed shard is
byte-for-byte the one it replaces."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import re
import time
from pathlib import Path

import torch
from safetensors.torch import save as safetensors_bytes

from kdfast.teacher_cache import fingerprints
from kdfast.teacher_cache.manifest import CacheSettings, Manifest, remove_temporaries, shard_name, write_atomically
from kdfast.teacher_cache.processes import WriterPart, folder_manifests, merge_parts
from kdfast.teacher_cache.progress import TokenProgress
from kdfast.teacher_cache.sources import teacher_source
from kdfast.teacher_cache.targets import METHODS

LOGPROB_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
LOCK_NAME = ".lock"


def id_dtype_for(vocab_size: int) -> torch.dtype:
    """The narrowest signed type that holds every id and the padding -1 (2 bytes per id up to 32768 tokens)."""
    return torch.int16 if vocab_size <= 2**15 else torch.int32


def check_windows(windows) -> None:
    if not isinstance(windows, torch.Tensor) or windows.dim() != 2 or windows.dtype.is_floating_point:
        raise ValueError(f"windows must be an integer tensor [num_windows, window_tokens] of token ids, got "
                         f"{type(windows).__name__ if not isinstance(windows, torch.Tensor) else tuple(windows.shape)}")
    if windows.shape[0] < 1 or windows.shape[1] < 2:
        raise ValueError(f"windows must hold at least one window of at least 2 tokens, got {tuple(windows.shape)}")


def cache_settings(source, windows: torch.Tensor, *, tokenizer, vocab_size=None, method="top_k", k=32,
                   temperature=1.0, seed=0, logprob_dtype="fp16", windows_per_shard=256,
                   teacher_name=None) -> CacheSettings:
    """The settings of a cache of `source` (sources.teacher_source) over `windows`, every argument checked."""
    check_windows(windows)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if logprob_dtype not in LOGPROB_DTYPES:
        raise ValueError(f"logprob_dtype must be one of {sorted(LOGPROB_DTYPES)}, got {logprob_dtype!r}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if not isinstance(windows_per_shard, int) or windows_per_shard < 1:
        raise ValueError(f"windows_per_shard must be an int >= 1, got {windows_per_shard!r}")
    source.check(method, float(temperature))
    head_rows = source.head_rows  # None for a server: each answer's ids are checked instead
    vocab_size = vocab_size if vocab_size is not None else min(len(tokenizer), head_rows or len(tokenizer))
    if not isinstance(vocab_size, int) or vocab_size < 1 or (head_rows is not None and vocab_size > head_rows):
        raise ValueError(f"vocab_size must be an int in [1, {head_rows}] (the teacher's LM-head rows), got "
                         f"{vocab_size!r}")
    if not isinstance(k, int) or not 1 <= k <= vocab_size:
        raise ValueError(f"k (ids stored per token) must be an int in [1, {vocab_size}], got {k!r}")
    low, high = int(windows.min()), int(windows.max())
    if low < 0 or high >= vocab_size:
        raise ValueError(f"windows hold token ids in [{low}, {high}], outside the vocabulary [0, {vocab_size})")
    return CacheSettings(
        **source.identity(teacher_name), tokenizer=fingerprints.tokenizer_fingerprint(tokenizer),
        windows=fingerprints.tensor_fingerprint(windows), num_windows=windows.shape[0],
        window_tokens=windows.shape[1], vocab_size=vocab_size, method=method, k=k, temperature=float(temperature),
        seed=int(seed), logprob_dtype=logprob_dtype, id_dtype=str(id_dtype_for(vocab_size)).removeprefix("torch."),
        windows_per_shard=windows_per_shard)


@contextlib.contextmanager
def exclusive(folder: Path, lock_name: str = LOCK_NAME):
    """One writer per cache folder (per part of it, with many processes): a second one fails at once instead of
    racing the first. The kernel drops the lock when its holder dies, however it dies."""
    with open(folder / lock_name, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            raise RuntimeError(f"another process (pid {handle.read().strip() or '?'}) is writing the teacher cache in "
                               f"{folder}; wait for it or choose another folder") from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _file_sha256(path: Path) -> str:
    hasher = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            hasher.update(block)
    return hasher.hexdigest()


def shard_is_intact(folder: Path, entry: dict, check_sha256: bool = True) -> bool:
    path = folder / entry["file"]
    if not path.is_file() or path.stat().st_size != entry["bytes"]:
        return False
    return not check_sha256 or _file_sha256(path) == entry["sha256"]


def shard_tensors(source, windows: torch.Tensor, settings: CacheSettings, index: int,
                  on_tokens=lambda tokens: None) -> dict:
    """input_ids [W, L + 1], teacher_ids [W, L, k] and teacher_logprobs [W, L, k] of shard `index` (row i of the
    targets: the teacher's distribution of token i + 1 given tokens 0..i)."""
    start, end = settings.shard_windows(index)
    ids, logprobs = source.shard_targets(windows[start:end], settings, index, on_tokens)
    return {"input_ids": windows[start:end].to(torch.int32).contiguous(),
            "teacher_ids": ids.to("cpu", getattr(torch, settings.id_dtype)).contiguous(),
            "teacher_logprobs": logprobs.to("cpu", LOGPROB_DTYPES[settings.logprob_dtype]).contiguous()}


def build_teacher_cache(teacher, windows: torch.Tensor, folder, *, tokenizer, k=32, method="top_k", temperature=1.0,
                        seed=0, logprob_dtype="fp16", windows_per_shard=256, batch_size=8, vocab_size=None,
                        teacher_name=None, overwrite=False, console=None, show_progress=True, process_index=0,
                        num_processes=1):
    """Runs `teacher` (a causal LM, in eval mode, on its device; or a `ServedTeacher`) over `windows`
    ([num_windows, window_tokens] token ids) and writes a teacher cache to `folder`, or finishes the one a killed run
    left there. With `num_processes` > 1 this process writes its part of the shards (`processes.WriterPart`) and the
    last one to finish completes the cache. Returns the `TeacherCache` once complete, else None (other processes'
    shards are missing). A folder holding a cache with other settings is an error unless `overwrite=True`."""
    from kdfast.teacher_cache.reader import TeacherCache

    source = teacher_source(teacher, batch_size)
    part = WriterPart(process_index, num_processes)
    settings = cache_settings(source, windows, tokenizer=tokenizer, vocab_size=vocab_size, method=method, k=k,
                              temperature=temperature, seed=seed, logprob_dtype=logprob_dtype,
                              windows_per_shard=windows_per_shard, teacher_name=teacher_name)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with exclusive(folder, part.lock_name):
        remove_temporaries(folder, lambda name: name == part.manifest_name or _owned_shard(name, part))
        manifest = _resumable_manifest(folder, settings, overwrite, part)
        manifest.origin = source.origin
        computed = _compute_missing_shards(source, windows, folder, manifest, part, console, show_progress)
        manifest.complete = True
        manifest.stats = _stats(folder, manifest, computed)
        manifest.save(folder, part.manifest_name)
    return TeacherCache(folder) if merge_parts(folder, settings, lambda main, work: _stats(folder, main, work)) \
        else None


def _owned_shard(name: str, part: WriterPart) -> bool:
    match = re.fullmatch(r"shard-(\d+)\.safetensors", name)
    return match is not None and part.owns(int(match.group(1)))


def _resumable_manifest(folder: Path, settings: CacheSettings, overwrite: bool, part: WriterPart) -> Manifest:
    """This process's manifest to continue from: every intact shard it owns that a manifest in the folder lists."""
    manifests = folder_manifests(folder)
    for name, manifest in manifests.items():
        differences = manifest.settings.differences(settings)
        if differences and not overwrite:
            raise ValueError(f"{folder} holds a teacher cache made with other settings ({'; '.join(differences)}): "
                             f"choose another folder, or pass overwrite=True (--overwrite) to replace it")
        if differences:  # replaced: each process removes its own shards
            (folder / name).unlink(missing_ok=True)
            for path in folder.glob("shard-*.safetensors"):
                if _owned_shard(path.name, part):
                    path.unlink()
    shards = {}
    for manifest in manifests.values():
        if not manifest.settings.differences(settings):
            shards.update({index: entry for index, entry in manifest.shards.items()
                           if part.owns(index) and index not in shards and shard_is_intact(folder, entry)})
    manifest = Manifest(settings, shards)
    manifest.save(folder, part.manifest_name)
    return manifest


def _compute_missing_shards(source, windows, folder, manifest, part, console, show_progress) -> dict:
    settings = manifest.settings
    tokens_per_window = settings.window_tokens - 1
    owned = [index for index in range(settings.num_shards) if part.owns(index)]
    missing = [index for index in owned if index not in manifest.shards]
    windows_of = [end - start for start, end in map(settings.shard_windows, owned)]
    done = sum(end - start for start, end in map(settings.shard_windows, manifest.shards)) * tokens_per_window
    started, tokens = time.perf_counter(), 0
    with TokenProgress(sum(windows_of) * tokens_per_window, done, console, show_progress) as progress:
        for index in missing:
            tensors = shard_tensors(source, windows, settings, index, progress.advance)
            start, end = settings.shard_windows(index)
            # One metadata entry: safetensors writes its metadata map in no fixed order, and a recomputed shard must
            # be byte-for-byte the one it replaces.
            metadata = {"kdfast-teacher-cache": json.dumps({"shard": index, "windows": [start, end],
                                                            "cache": settings.windows + settings.teacher_weights})}
            data = safetensors_bytes(tensors, metadata=metadata)
            write_atomically(folder / shard_name(index), data)
            manifest.shards[index] = {"file": shard_name(index), "windows": [start, end], "bytes": len(data),
                                      "sha256": hashlib.sha256(data).hexdigest()}
            manifest.save(folder, part.manifest_name)  # only now does the shard count as done
            tokens += (end - start) * tokens_per_window
    return {"shards_computed": len(missing), "shards_reused": len(owned) - len(missing),
            "tokens_computed": tokens, "seconds": time.perf_counter() - started}


def _stats(folder: Path, manifest: Manifest, computed: dict) -> dict:
    settings = manifest.settings
    tokens = settings.num_windows * (settings.window_tokens - 1)
    shard_bytes = sum(entry["bytes"] for entry in manifest.shards.values())
    seconds = computed["seconds"]
    return {"tokens": tokens, "bytes": shard_bytes, "bytes_per_token": shard_bytes / tokens, **computed,
            "tokens_per_second": computed["tokens_computed"] / seconds if computed["tokens_computed"] else None}
