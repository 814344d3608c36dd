"""A teacher cache on disk: `manifest.json` (what made the cache, and each finished shard's file, windows, size and
sha256) beside shards `shard-NNNNN.safetensors`. Every file is written to a temporary name, flushed to disk and then
renamed, so a process killed at any point leaves either the old file or the new one, never a part of one."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

FORMAT, VERSION = "kdfast-teacher-cache", 1
MANIFEST_NAME = "manifest.json"
TEMPORARY_MARK = ".tmp-"  # in the names of files not yet renamed into place


@dataclass(frozen=True)
class CacheSettings:
    """Everything that determines a cache's contents: two caches with equal settings hold the same bytes."""

    teacher: str  # the teacher's name or path (informative; the fingerprints below decide)
    teacher_config: str  # fingerprints.config_fingerprint
    teacher_weights: str  # fingerprints.weights_checksum
    tokenizer: str  # fingerprints.tokenizer_fingerprint
    windows: str  # fingerprints.tensor_fingerprint of the [num_windows, window_tokens] token windows
    num_windows: int
    window_tokens: int  # tokens per window; the teacher predicts tokens 1.. of each from the ones before
    vocab_size: int
    method: str  # "top_k" or "sample"
    k: int  # stored ids per token: top-k's k, or the number of samples
    temperature: float
    seed: int  # the sampler's seed (method="sample")
    logprob_dtype: str
    id_dtype: str
    windows_per_shard: int

    @property
    def num_shards(self) -> int:
        return -(-self.num_windows // self.windows_per_shard)

    def shard_windows(self, index: int) -> tuple[int, int]:
        start = index * self.windows_per_shard
        return start, min(start + self.windows_per_shard, self.num_windows)

    def differences(self, other: CacheSettings) -> list[str]:
        """The settings that differ, but for the teacher's name: the same checkpoint loaded from another path (or
        trained in this process, with no path) makes the same cache."""
        return [f"{name}: {getattr(self, name)!r} vs {getattr(other, name)!r}"
                for name in (f.name for f in dataclasses.fields(self))
                if name != "teacher" and getattr(self, name) != getattr(other, name)]


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


@dataclass
class Manifest:
    settings: CacheSettings
    shards: dict = field(default_factory=dict)  # index -> {"file", "windows", "bytes", "sha256"}
    complete: bool = False
    stats: dict = field(default_factory=dict)
    origin: dict = field(default_factory=dict)  # what computed the targets: a model here, or a server (API, model)

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT, "version": VERSION, "settings": dataclasses.asdict(self.settings),
                           "complete": self.complete, "stats": self.stats, "origin": self.origin,
                           "shards": {str(index): entry for index, entry in sorted(self.shards.items())}}, indent=1)

    @classmethod
    def load(cls, folder: Path, name: str = MANIFEST_NAME) -> Manifest:
        path = folder / name
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"{folder} is not a kdfast teacher cache: it has no {MANIFEST_NAME}") from None
        if data.get("format") != FORMAT or data.get("version") != VERSION:
            raise ValueError(f"{path} is not a version-{VERSION} {FORMAT} manifest (format {data.get('format')!r}, "
                             f"version {data.get('version')!r})")
        return cls(CacheSettings(**data["settings"]), {int(k): v for k, v in data["shards"].items()},
                   data["complete"], data.get("stats", {}), data.get("origin", {}))

    def save(self, folder: Path, name: str = MANIFEST_NAME) -> None:
        write_atomically(folder / name, self.to_json().encode())


def write_atomically(path: Path, data: bytes) -> None:
    """Write to a temporary name in the same folder, fsync, rename over `path`, fsync the folder."""
    temporary = path.with_name(f"{path.name}{TEMPORARY_MARK}{os.getpid()}")
    with open(temporary, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def remove_temporaries(folder: Path, owned=lambda name: True) -> None:
    """What a killed writer left under temporary names, for the files `owned(name)` says are the caller's (only the
    holder of those files' lock calls this: another writer's temporaries may be in progress)."""
    for path in folder.glob(f"*{TEMPORARY_MARK}*"):
        if owned(path.name.split(TEMPORARY_MARK)[0]):
            path.unlink(missing_ok=True)
