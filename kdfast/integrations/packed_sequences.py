"""A batch of packed sequences (padding-free: several examples laid end to end in one row, as transformers'
`DataCollatorWithFlattening` and TRL's `padding_free=True` make them): the positions that restart at each example are
what keeps a decoder's attention inside it, so the trainers pass them to every model they run."""

from __future__ import annotations

# What DataCollatorWithFlattening adds: positions restarting at 0 per example, and for flash-attention's varlen
# kernels the examples' cumulative lengths (`return_flash_attn_kwargs=True`), and Mamba-style layers' `seq_idx`.
POSITION_KEY = "position_ids"
VARLEN_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx")


def packing_inputs(inputs) -> dict:
    """The batch's positions and varlen lengths (those it holds, not None), which every model must get with the ids:
    without them each packed row reads as one long example whose later tokens attend to the earlier examples'. A
    batch with varlen lengths alone is refused: the lengths reach flash-attention's kernels only, and the eager and
    SDPA attentions (the CPU's, and any model not loaded with flash-attention) would attend across examples."""
    found = {key: inputs[key] for key in (POSITION_KEY, *VARLEN_KEYS) if inputs.get(key) is not None}
    if found and POSITION_KEY not in found:
        raise ValueError(f"the batch holds {sorted(found)} but no position_ids: packed examples need positions that "
                         f"restart at each example (DataCollatorWithFlattening(return_position_ids=True), its "
                         f"default), which every attention implementation reads")
    return found
