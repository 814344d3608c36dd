"""The cross-entropy of mapped logits: `F.cross_entropy(softcap(logit_scale * logits), labels)` with the map fused in
row chunks, as Liger-Kernel's `LigerCrossEntropyLoss(softcap=)` takes logits a model left uncapped (Gemma-2's
final_logit_softcapping). Without it a user writes the cap in torch, whose capped logits and their gradients raised
eager PyTorch's peak from 750 to 1000 MiB at 2048 x 32000 fp32 (`kdfast bench ce --softcap 30 --memory`).

Per chunk of rows: the chunk's mapped logits in float32 (16-bit logits are mapped once in float32, as
kdfast.logit_maps does after a GEMM), the CE kernel's loss and gradient over them in place, the map's chain rule, and
the gradient written into the [N, V] buffer, or over the logits' own storage with `inplace_backward=True`. Two
float32 chunks are all the map adds."""

from __future__ import annotations

import torch

from kdfast import ops
from kdfast.kernel_abi import PART_COLUMNS
from kdfast.logit_maps import LogitMap
from kdfast.options import LossOptions
from kdfast.reduction import reduced_outputs, reduction_scale
from kdfast.saved_gradient import saved_gradient_times
from kdfast.token_scaling import weighed_rows
from kdfast.views import as_rows_view, flat_labels

# Bytes the (at most) two float32 chunks may take together. On the CPU small enough that the map's passes over a chunk
# find it in the last-level cache: at 2048 x 32000 with softcap 30, in place, a call took 181-194 ms in chunks of 32 to
# 64 rows (8-16 MiB) against 211-239 ms in chunks of 98 (25 MiB) and 208-221 ms in chunks of 8 to 16, where each
# chunk's kernel launch tells (2 threads of an AMD EPYC with a 32 MiB L3, medians of 5, two rounds). With the CPU
# extension's one-pass cap (kdfast.cpu_softcap), 8 MiB: 124-148 ms against 131-160 at 12 MiB and 132-172 at 16 (two
# sweeps of 9 interleaved rounds).
CHUNK_BYTES = {"cpu": 8 * 2**20, "cuda": 128 * 2**20}


def chunk_rows(vocab: int, device: torch.device) -> int:
    """Rows per chunk: the (at most) two float32 [rows, V] temporaries within the device's budget."""
    budget = CHUNK_BYTES.get(device.type, CHUNK_BYTES["cpu"])
    return max(1, budget // (2 * 4 * max(vocab, 1)))


def _mapped_chunk_(rows: torch.Tensor, logit_map: LogitMap, mapped: torch.Tensor, kept: torch.Tensor) -> None:
    """The chunk's mapped logits into `mapped` (float32), and into `kept` what the chain rule reads: tanh(scale * x /
    c) with a softcap (computed once: the chain rule reuses it), nothing without one (it is `mapped` then)."""
    # The GEMM's share of the map (all of it without a softcap), in float32: a 16-bit product would round once more.
    target = mapped if logit_map.softcap is None else kept
    if rows.dtype == torch.float32:
        torch.mul(rows, logit_map.gemm_factor, out=target)
    else:
        target.copy_(rows).mul_(logit_map.gemm_factor)
    if logit_map.softcap is not None:
        logit_map.cap_(kept, mapped)


def _chained_(grad: torch.Tensor, logit_map: LogitMap, kept: torch.Tensor) -> torch.Tensor:
    """d loss / d mapped logits times d mapped / d logits, in place."""
    return logit_map.chain_(grad, None) if logit_map.softcap is None else logit_map.tanh_chain_(grad, kept)


class MappedCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, num_items_in_batch, opts: LossOptions, logit_map: LogitMap,
                class_weights=None, token_scaling=None):
        lead_shape = logits.shape[:-1]
        batched, copied = as_rows_view(logits)  # [batch, rows, V]
        flat = flat_labels(labels)
        batch, rows, vocab = batched.shape
        # Per-class weights and token scalings (kdfast.token_scaling) weigh each chunk's parts and gradient after its
        # kernel.
        weighted = weighed_rows(class_weights, token_scaling, flat, opts, num_items_in_batch, opts.vocab_size or vocab)
        if weighted is not None:
            num_items_in_batch = weighted.denominator
        scale = reduction_scale(flat, batch * rows, opts, num_items_in_batch, batched.device)
        want_grad = ctx.needs_input_grad[0]
        if not want_grad:
            grad = None
        elif opts.inplace_backward:
            grad = batched  # the logits' storage (or the copy as_rows_view made): each chunk is read before written
        else:
            grad = torch.empty(batched.shape, dtype=logits.dtype, device=logits.device)
        settings = (opts if weighted is None else weighted.kernel_options).encoded()
        step = min(chunk_rows(vocab, batched.device), max(rows, 1))
        # The float32 chunks taken once (a fresh one per chunk costs the CPU its page faults each time); the second
        # only where there is a tanh to keep.
        mapped_rows = torch.empty(step, vocab, dtype=torch.float32, device=batched.device)
        kept_rows = torch.empty_like(mapped_rows) if logit_map.softcap is not None else mapped_rows
        parts = [torch.zeros(0, PART_COLUMNS, dtype=torch.float32, device=batched.device)]  # no rows: a 0 loss
        for b in range(batch):
            for start in range(0, rows, step):
                stop = min(start + step, rows)
                mapped, kept = mapped_rows[:stop - start], kept_rows[:stop - start]
                _mapped_chunk_(batched[b, start:stop], logit_map, mapped, kept)
                chunk_labels = flat[b * rows + start:b * rows + stop] if flat is not None else None
                flat_rows = slice(b * rows + start, b * rows + stop)
                if weighted is not None:
                    weighted.observe(flat_rows, mapped)
                # The CE reads no teacher (kd_weight is 0): the student's rows stand in, as kdfast.cross_entropy does.
                parts.append(ops.distill_forward_inplace(mapped.unsqueeze(0), mapped.unsqueeze(0), chunk_labels, scale,
                                                         settings))
                factors = weighted.of_chunk(flat_rows, parts[-1]) if weighted is not None else None
                if grad is not None and factors is not None:
                    mapped.mul_(factors[:, None])
                    weighted.add_to_gradient_(flat_rows, mapped, scale)
                if grad is not None:
                    grad[b, start:stop] = _chained_(mapped, logit_map, kept)
        if grad is not None:
            ctx.save_for_backward(grad.view(logits.shape) if copied or not opts.inplace_backward else logits.detach())
        ctx.reduction = opts.reduction
        return reduced_outputs(ctx, torch.cat(parts), lead_shape, flat, opts, scale)

    @staticmethod
    def backward(ctx, grad_output, *summary_grad):
        return saved_gradient_times(ctx, grad_output), None, None, None, None, None, None
