"""Many processes writing one cache (torchrun, or the jobs of an array): process i of n computes the shards whose
index is i modulo n, under a lock of its own, and lists them in a part manifest `manifest-i-of-n.json`; the last
process to finish merges every part into the one `manifest.json` that readers see, and removes the parts. The shards
are the same files whatever the number of processes (a shard's windows and bytes depend on the settings only), so a
cache begun with one process count can be finished with another: every writer adopts the intact shards that any
manifest in the folder lists."""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
from dataclasses import dataclass
from pathlib import Path

from kdfast.teacher_cache.manifest import MANIFEST_NAME, CacheSettings, Manifest

PART_NAME = re.compile(r"manifest-(\d+)-of-(\d+)\.json")
MERGE_LOCK_NAME = ".merge-lock"


@dataclass(frozen=True)
class WriterPart:
    """Which shards this process writes: those with shard % count == index."""

    index: int = 0
    count: int = 1

    def __post_init__(self):
        if not isinstance(self.count, int) or self.count < 1:
            raise ValueError(f"num_processes must be an int >= 1, got {self.count!r}")
        if not isinstance(self.index, int) or not 0 <= self.index < self.count:
            raise ValueError(f"process_index must be an int in [0, {self.count}), got {self.index!r}")

    @classmethod
    def from_environment(cls) -> WriterPart:
        """torchrun's RANK and WORLD_SIZE (one process when they are not set)."""
        return cls(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)))

    def owns(self, shard: int) -> bool:
        return shard % self.count == self.index

    @property
    def lock_name(self) -> str:
        return ".lock" if self.count == 1 else f".lock-{self.index}-of-{self.count}"

    @property
    def manifest_name(self) -> str:
        return MANIFEST_NAME if self.count == 1 else f"manifest-{self.index}-of-{self.count}.json"


def folder_manifests(folder: Path) -> dict[str, Manifest]:
    """Every manifest in `folder` by file name: the cache's own and the parts of unfinished multi-process runs."""
    found = {}
    for path in sorted(folder.glob("manifest*.json")):
        if path.name == MANIFEST_NAME or PART_NAME.fullmatch(path.name):
            with contextlib.suppress(FileNotFoundError):  # a part its writer merged and removed meanwhile
                found[path.name] = Manifest.load(folder, path.name)
    return found


@contextlib.contextmanager
def merging(folder: Path):
    """One merger at a time; the others wait (merging is a few file reads)."""
    with open(folder / MERGE_LOCK_NAME, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def merge_parts(folder: Path, settings: CacheSettings, stats_of) -> bool:
    """Writes the complete `manifest.json` once the manifests with `settings` list every shard, and removes the
    parts. True when the cache is complete. `stats_of(manifest, computed)` makes the merged stats from the summed
    work of the parts that finished."""
    with merging(folder):
        manifests = {name: manifest for name, manifest in folder_manifests(folder).items()
                     if not manifest.settings.differences(settings)}
        main = manifests.get(MANIFEST_NAME)
        if main is None or not main.complete:
            for name, manifest in list(manifests.items()):
                if manifest.complete:
                    continue
                if _still_written(folder, name):
                    return False  # its writer merges when it finishes (its part may list every shard already)
                # Its writer let go of its lock: the part is final now, and that writer may have completed it (and
                # be waiting for this merge) since the read above.
                with contextlib.suppress(FileNotFoundError):
                    manifests[name] = Manifest.load(folder, name)
            shards = {}
            for manifest in manifests.values():
                shards.update(manifest.shards)
            if len(shards) < settings.num_shards:
                return False
            finished = [manifest for manifest in manifests.values() if manifest.complete and manifest.stats]
            main = Manifest(settings, dict(sorted(shards.items())), complete=True,
                            origin=next((m.origin for m in finished if m.origin), {}))
            main.stats = stats_of(main, _summed_work(finished, settings))
            main.save(folder)
        for name in manifests:
            if name != MANIFEST_NAME:
                (folder / name).unlink(missing_ok=True)
    return True


def _still_written(folder: Path, part_name: str) -> bool:
    """Whether the writer of an unfinished part holds its lock (alive; one killed left a stale part to ignore)."""
    match = PART_NAME.fullmatch(part_name)
    if match is None:
        return False
    lock = folder / WriterPart(int(match.group(1)), int(match.group(2))).lock_name
    if not lock.exists():
        return False
    with open(lock, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
        return False


def _summed_work(finished: list[Manifest], settings: CacheSettings) -> dict:
    computed = sum(manifest.stats.get("shards_computed", 0) for manifest in finished)
    return {"shards_computed": computed, "shards_reused": settings.num_shards - computed,
            "tokens_computed": sum(manifest.stats.get("tokens_computed", 0) for manifest in finished),
            "seconds": max((manifest.stats.get("seconds", 0.0) for manifest in finished), default=0.0),
            "processes": len(finished)}
