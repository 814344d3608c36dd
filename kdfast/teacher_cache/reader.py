"""Reading a teacher cache: `TeacherCache` checks the manifest and every shard against it, and is a torch Dataset of
windows, each with its teacher targets aligned with the tokens (row j: the teacher's distribution of token j), so a
collator pads and shifts them exactly as it does the labels."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from kdfast.teacher_cache import fingerprints
from kdfast.teacher_cache.manifest import CacheSettings, Manifest
from kdfast.teacher_cache.writer import shard_is_intact


class TeacherCache(torch.utils.data.Dataset):
    """A finished cache in `folder`. Item i: `input_ids` [L + 1] (int64), `teacher_ids` [L + 1, k] (int64, -1 for
    padding, row 0 all -1: nothing predicts the first token) and `teacher_logprobs` [L + 1, k] (float32).
    `verify` checks every shard's sha256 (else only its size)."""

    def __init__(self, folder, *, verify: bool = True):
        self.folder = Path(folder)
        self.manifest = Manifest.load(self.folder)
        settings = self.manifest.settings
        if not self.manifest.complete:
            raise ValueError(f"the teacher cache in {self.folder} is incomplete ({len(self.manifest.shards)} of "
                             f"{settings.num_shards} shards): run the same `kdfast teacher-cache` command again to "
                             "finish it (finished shards are kept)")
        for index in range(settings.num_shards):
            entry = self.manifest.shards.get(index)
            if entry is None or not shard_is_intact(self.folder, entry, check_sha256=verify):
                raise ValueError(f"shard {index} of the teacher cache in {self.folder} is missing or differs from "
                                 "its manifest entry (size or sha256): run the same `kdfast teacher-cache` command "
                                 "again to recompute it")
        self._open = {}

    @property
    def settings(self) -> CacheSettings:
        return self.manifest.settings

    @property
    def stats(self) -> dict:
        return self.manifest.stats

    def __len__(self) -> int:
        return self.settings.num_windows

    def _shard(self, index: int):
        if index not in self._open:  # opened lazily, once per process (a DataLoader worker opens its own)
            path = self.folder / self.manifest.shards[index]["file"]
            self._open[index] = safe_open(str(path), framework="pt")
        return self._open[index]

    def __getstate__(self):
        return {**self.__dict__, "_open": {}}  # open files do not travel to worker processes

    def __getitem__(self, window: int) -> dict:
        if not -len(self) <= window < len(self):
            raise IndexError(f"window {window} out of range for a cache of {len(self)} windows")
        window %= len(self)
        shard = self._shard(window // self.settings.windows_per_shard)
        row = window % self.settings.windows_per_shard
        ids = shard.get_slice("teacher_ids")[row].to(torch.int64)
        logprobs = shard.get_slice("teacher_logprobs")[row].to(torch.float32)
        return {"input_ids": shard.get_slice("input_ids")[row].to(torch.int64),
                "teacher_ids": torch.cat([torch.full_like(ids[:1], -1), ids]),
                "teacher_logprobs": torch.cat([torch.zeros_like(logprobs[:1]), logprobs])}

    def batch(self, start: int, end: int) -> dict:
        """Windows [start, end) stacked, read as whole slices (a shard at a time), as items are: `input_ids`
        [n, L + 1], `teacher_ids` / `teacher_logprobs` [n, L + 1, k]. For consecutive batches without a DataLoader."""
        if not 0 <= start < end <= len(self):
            raise IndexError(f"windows [{start}, {end}) out of range for a cache of {len(self)} windows")
        per_shard, parts = self.settings.windows_per_shard, {"input_ids": [], "teacher_ids": [], "teacher_logprobs": []}
        for index in range(start // per_shard, (end - 1) // per_shard + 1):
            shard = self._shard(index)
            low, high = max(start - index * per_shard, 0), min(end - index * per_shard, per_shard)
            for name, values in parts.items():
                values.append(shard.get_slice(name)[low:high])
        ids = torch.cat(parts["teacher_ids"]).to(torch.int64)
        logprobs = torch.cat(parts["teacher_logprobs"]).to(torch.float32)
        return {"input_ids": torch.cat(parts["input_ids"]).to(torch.int64),
                "teacher_ids": torch.cat([torch.full_like(ids[:, :1], -1), ids], 1),
                "teacher_logprobs": torch.cat([torch.zeros_like(logprobs[:, :1]), logprobs], 1)}

    def windows(self) -> torch.Tensor:
        """Every window's token ids, [num_windows, window_tokens] int64."""
        return torch.cat([self._shard(index).get_tensor("input_ids").to(torch.int64)
                          for index in range(self.settings.num_shards)])

    def check_tokenizer(self, tokenizer) -> None:
        """A ValueError unless `tokenizer` maps text to the ids the cache was made with."""
        found = fingerprints.tokenizer_fingerprint(tokenizer)
        if found != self.settings.tokenizer:
            raise ValueError(f"the teacher cache in {self.folder} was made with another tokenizer (fingerprint "
                             f"{self.settings.tokenizer}, this one's {found}): its token ids would not mean the "
                             "student's tokens. Rebuild the cache with the student's tokenizer")

    def check_input_ids(self, rows) -> None:
        """A ValueError unless `rows` (a sequence of token-id rows) are the cache's windows, in order: the targets
        of window i only fit the tokens of window i."""
        if len(rows) != len(self):
            raise ValueError(f"the training data has {len(rows)} rows but the teacher cache in {self.folder} holds "
                             f"{len(self)} windows: they must be the same sequences, in the same order")
        windows = self.windows()
        for index, row in enumerate(rows):
            row = torch.as_tensor(row, dtype=torch.int64)
            if row.shape != windows[index].shape or not torch.equal(row, windows[index]):
                raise ValueError(f"row {index} of the training data differs from window {index} of the teacher cache "
                                 f"in {self.folder} ({row.numel()} vs {windows.shape[1]} tokens"
                                 f"{', same length, other tokens' if row.numel() == windows.shape[1] else ''}): the "
                                 "cache was made on other sequences or another layout (window length "
                                 f"{windows.shape[1]})")
