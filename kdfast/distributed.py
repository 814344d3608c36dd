"""Vocab parallelism's plumbing: which slice of the vocabulary this rank holds, a check that the ranks agree
(one small fixed-size exchange, so a mismatch is the same clear error on every rank rather than a hang), and
the collectives the loss uses, with a count of the bytes each rank sends."""

from __future__ import annotations

import contextlib
import zlib
from dataclasses import dataclass

import torch

from kdfast.options import LossOptions


@dataclass(frozen=True)
class VocabShard:
    group: object  # a torch.distributed ProcessGroup
    start: int  # this rank's [start, stop) of the global vocabulary
    stop: int
    vocab: int  # the global vocabulary size
    reduce_hidden_grad: bool = True  # fused linear form: sum d hidden over the ranks
    widest: int = 0  # the widest rank's shard: row chunks sized by it are the same on every rank (0: unknown)

    @property
    def size(self) -> int:
        return self.stop - self.start


@dataclass
class Traffic:
    """What this rank sent through kdfast's collectives: calls made and bytes contributed."""

    calls: int = 0
    bytes: int = 0


_traffic = [Traffic()]


@contextlib.contextmanager
def count_traffic():
    """`with count_traffic() as traffic:` counts the collectives kdfast runs inside the block."""
    traffic = Traffic()
    _traffic.append(traffic)
    try:
        yield traffic
    finally:
        _traffic.remove(traffic)


def _record(tensor: torch.Tensor) -> None:
    for traffic in _traffic:
        traffic.calls += 1
        traffic.bytes += tensor.numel() * tensor.element_size()


def all_gather(tensor: torch.Tensor, group) -> torch.Tensor:
    """[world, *tensor.shape]: every rank's tensor, in rank order."""
    import torch.distributed as dist

    tensor = tensor.contiguous()
    _record(tensor)
    world = dist.get_world_size(group)
    out = torch.empty((world * tensor.shape[0], *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # renamed in torch 2.13
    gather(out, tensor, group=group)
    return out.view(world, *tensor.shape)


def all_reduce_sum(tensor: torch.Tensor, group) -> torch.Tensor:
    import torch.distributed as dist

    _record(tensor)
    dist.all_reduce(tensor, group=group)
    return tensor


def all_reduce_max(tensor: torch.Tensor, group) -> torch.Tensor:
    import torch.distributed as dist

    _record(tensor)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=group)
    return tensor


def _settings_code(opts: LossOptions) -> int:
    """A checksum of the settings that must agree across ranks (each rank may pick its own backend)."""
    return zlib.crc32(opts.replace(backend="auto", inplace_backward=False).encoded().encode())


def check_then_agree(check, local_vocab, rows_of: torch.Tensor, process_group, vocab_range, labels,
                     opts: LossOptions, reduce_hidden_grad: bool = True, labels_name: str = "labels") -> VocabShard:
    """Runs this rank's input checks (`check()`, raising ValueError) and then the agreement exchange, which every
    rank must reach whatever its inputs: a failed check is carried through it, so all ranks raise instead of the
    others hanging. `local_vocab()` is this rank's shard size (called only when the checks passed); `rows_of`
    is the student tensor whose leading dimensions are the rows, and whose device the exchange uses."""
    error = None
    try:
        check()
    except ValueError as exc:
        error = exc
    valid = error is None
    rows = rows_of.numel() // max(rows_of.shape[-1], 1) if valid else -1
    device = rows_of.device if isinstance(rows_of, torch.Tensor) else None
    return agree_on_shard(process_group, vocab_range, local_vocab() if valid else 0, rows,
                          labels if valid else None, opts, device, error, reduce_hidden_grad, labels_name)


def agree_on_shard(process_group, vocab_range, local_vocab: int, rows: int, labels, opts: LossOptions, device,
                   local_error: Exception | None = None, reduce_hidden_grad: bool = True,
                   labels_name: str = "labels") -> VocabShard:
    """Exchanges [start, stop, rows, settings, label range, error flag] with every rank and checks that the
    ranges tile [0, V) and that rows, settings and labels agree. Every rank reaches the same verdict, so a
    mismatch raises the same ValueError everywhere. `local_error` is this rank's own input error, raised on
    every rank after the exchange for the same reason. `labels_name`: the labels' argument, for its range error
    ("token_ids" for kdfast.linear_token_logprobs, whose ids are no CE term's labels)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("process_group was given but torch.distributed is not initialized "
                         "(call torch.distributed.init_process_group first)")
    rank = dist.get_rank(process_group)
    if vocab_range is None:
        start, stop = rank * local_vocab, (rank + 1) * local_vocab
    elif (isinstance(vocab_range, (tuple, list)) and len(vocab_range) == 2
          and all(isinstance(v, int) and not isinstance(v, bool) for v in vocab_range)):
        start, stop = vocab_range
        if local_error is None and stop - start != local_vocab:
            local_error = ValueError(f"vocab_range {tuple(vocab_range)} holds {stop - start} tokens but this rank's "
                                     f"shard has {local_vocab} (the logits' last dimension / the weights' rows)")
    else:
        start, stop = -1, -1
        local_error = local_error or ValueError(f"vocab_range must be (start, stop) ints, got {vocab_range!r}")
    low, high = _label_range(labels, opts)
    mine = torch.tensor([start, stop, rows, _settings_code(opts), low, high, int(local_error is not None)],
                        dtype=torch.int64)
    if device is None:  # no tensor to take it from: NCCL still needs the exchange on this rank's GPU
        nccl = dist.get_backend(process_group) == "nccl"
        device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    everyone = all_gather(mine.to(device), process_group).cpu().tolist()
    _raise_on_mismatch(everyone, rank, local_error, opts, labels_name)
    return VocabShard(process_group, start, stop, max(row[1] for row in everyone), reduce_hidden_grad,
                      max(row[1] - row[0] for row in everyone))


def _label_range(labels, opts: LossOptions) -> tuple[int, int]:
    """(min, max) of the kept labels, or (0, -1) when there are none to check."""
    if labels is None or not opts.needs_labels or labels.numel() == 0:
        return 0, -1
    kept = labels[labels != opts.ignore_index]
    if kept.numel() == 0:
        return 0, -1
    return int(kept.min()), int(kept.max())


def _raise_on_mismatch(everyone, rank, local_error, opts: LossOptions, labels_name: str) -> None:
    failed = [r for r, row in enumerate(everyone) if row[6]]
    if failed:
        if local_error is not None:
            raise ValueError(f"rank {rank}: {local_error}") from local_error
        raise ValueError(f"rank(s) {failed} refused their inputs to the vocab-parallel loss (see their error)")
    rows = [row[2] for row in everyone]
    if len(set(rows)) > 1:
        raise ValueError(f"every rank must pass the same tokens (rows) to the vocab-parallel loss; rows per rank: "
                         f"{rows}")
    if len({row[3] for row in everyone}) > 1:
        raise ValueError("the ranks' loss settings differ (divergence, beta, temperature, weights, t2_scale, "
                         "ignore_index or reduction): they must be identical")
    ranges = sorted((row[0], row[1], r) for r, row in enumerate(everyone))
    expected = 0
    for start, stop, _ in ranges:
        if start != expected or stop <= start:
            shown = ", ".join(f"rank {r}: [{a}, {b})" for a, b, r in sorted(ranges, key=lambda x: x[2]))
            raise ValueError(f"the ranks' vocab_range values must tile [0, V) without gaps or overlaps; got {shown}")
        expected = stop
    low = min((row[4] for row in everyone if row[5] >= 0), default=0)
    high = max(row[5] for row in everyone)
    if high >= expected or low < 0:
        bad = high if high >= expected else low
        allowed = f" or equal ignore_index={opts.ignore_index} when ce_weight > 0" if labels_name == "labels" else ""
        raise ValueError(f"{labels_name} must lie in [0, {expected}) (global token ids){allowed}; found {bad}")
