"""DeepSpeed ZeRO-3 parameters made whole for a while. Under ZeRO-3 each rank holds a shard of every parameter, and a
module's own forward gathers its parameters; a weight read elsewhere (an LM head read by a fused loss, or again in a
backward that recomputes from it) must be gathered for the duration. Nothing here imports DeepSpeed unless a
parameter is partitioned."""

from __future__ import annotations

import contextlib


def gathered(*params):
    """A context in which every ZeRO-3 partitioned parameter of `params` is whole (None entries are skipped); a
    no-op for tensors DeepSpeed does not partition."""
    partitioned = list({id(p): p for p in params if p is not None and hasattr(p, "ds_id")}.values())
    if not partitioned:
        return contextlib.nullcontext()
    return _zero3_gather(partitioned)


def _zero3_gather(params):
    import deepspeed
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    # Only what is sharded now: a parameter ZeRO-3 keeps whole (below its persistence threshold) or one a module's
    # forward has already gathered must not be released on exit (DeepSpeed refuses to free an active parameter).
    sharded = [p for p in params if p.ds_status == ZeroParamStatus.NOT_AVAILABLE]
    # modifier_rank=None: read-only, nothing is written back to the shards on exit.
    return deepspeed.zero.GatheredParameters(sharded, modifier_rank=None) if sharded else contextlib.nullcontext()
