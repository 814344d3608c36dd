"""Per-token log-probabilities of a linear LM head, and the entropy of its distribution, without [N, V] logits:
`linear_token_logprobs`, what the sampled-token estimators of on-policy distillation take (the reverse-KL advantage
log q - log p is two calls, one per model).

q = softmax(softcap(logit_scale * (hidden @ weight.T + bias)) / temperature), TRL's order. One chunk of logits
exists at a time; each row's log-sum-exp, -log q(token) and entropy come from kdfast's own CE kernel (a CE-only call
at T = 1 on logits that already hold the temperature). Forward is loss-only and keeps O(N) tensors and, when a
gradient will be asked for, its last chunk of logits; backward takes that chunk first, recomputes the others' logits
in its buffer, and lets the kernel write q - onehot(token) over them. Chunks are spread evenly over the rows.

A frozen head (only hidden wants a gradient) with the log-probs the only output: d hidden's row i is g_i a_i, with
a_i = -(q_i - onehot(t_i)) W times the map's slope, which does not depend on g. The forward then has the kernel
write q - onehot in the same pass as the statistics and takes a = that times W at once, [N, H] float32 kept; the
backward scales its rows and runs no chunk: two GEMMs in all, not three (LoRA training leaves the LM head frozen).
The same holds with the entropy returned when the caller says it will only be read (`entropy_grad=False`): which
outputs a backward differentiates is known only then, so that is a guess, and a wrong one costs a recompute.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kdfast import cpu_gemm
from kdfast.dispatch import rows_kernel_for
from kdfast.kernel_abi import PART_CE, PART_ENTROPY
from kdfast.linear_chunks import CHUNK_BUDGET_BYTES, Wanted, _accumulate_weight_grad, gemm_weight
from kdfast.linear_function import gemm_dtype
from kdfast.logit_maps import LogitMap, tempered_map
from kdfast.options import LossOptions
from kdfast.token_ops import METRICS, compiled_token_outputs
from kdfast.validation import (
    _check_bias,
    _check_floating,
    _check_one_device,
    _label_check_costs_no_sync,
    check_chunk_settings,
)
from kdfast.zero3 import gathered


def linear_token_logprobs(hidden, weight, token_ids, *, bias=None, temperature=1.0, logit_scale=1.0, softcap=None,
                          return_entropy=False, entropy_grad=True, ignore_index=None, chunk_size="auto",
                          fp32_logits=False, backend="auto", process_group=None, vocab_range=None,
                          reduce_hidden_grad=True):
    """log q(token) per row, float32 and shaped like `token_ids`, for hidden states [..., H], a head [V, H] (+ bias
    [V]) and token ids [...] in [0, V); with `return_entropy`, (log-probs, the entropy of q per row). Both outputs
    are differentiable to hidden, weight and bias. `chunk_size`: rows per chunk of logits ("auto": from a memory
    budget). Under torch.autocast the GEMMs run in autocast's dtype; sums are float32. With a frozen head (only
    `hidden` requires a gradient) and `return_entropy=False`, d hidden is taken in the forward: two GEMMs in all.
    `entropy_grad=False` says a returned entropy will only be read (logged, thresholded: GRPO without its entropy
    bonus), so a frozen head takes that two-GEMM path with the entropy too; a gradient that reaches the entropy after
    all is still exact, its backward recomputing the chunks (four GEMMs in all, one more than with True).
    `fp32_logits`: with 16-bit GEMMs, each chunk's logits are kept in float32 as the GEMM accumulated them, never
    rounded to 16 bits (bf16 moves a logit of 16 by up to 1/32, and the log-probs with it); the backward's GEMMs take
    the gradient rounded to 16 bits, as `linear_distill_loss(fp32_logits=True)` does (on CUDA the GEMM writes float32;
    elsewhere it runs in float32 on the 16-bit operands' values). `ignore_index` (an int; None: every id must be a
    token): rows whose id equals it get 0 for every output and no gradient, as torch's cross_entropy(reduction="none")
    gives an ignored label (SFT labels with -100 need no mask or clamp first).
    Vocab parallel (a tensor-parallel LM head): with a `process_group`, `weight` (and `bias`) are this rank's rows
    `vocab_range` of the global head (default: equal contiguous shards in rank order), hidden states and token ids
    (global) the same on every rank; each row's log-sum-exp, token logit and entropy sum are exchanged (O(rows) bytes
    a chunk, never logits), so every rank gets the global log-probs and entropy, its shard's weight and bias
    gradients, and the full d hidden, summed over the ranks unless `reduce_hidden_grad=False` leaves that to the
    caller's own tensor-parallel layer."""
    logprobs, entropy, _ = linear_token_outputs(
        hidden, weight, token_ids, bias=bias, temperature=temperature, logit_scale=logit_scale, softcap=softcap,
        return_entropy=return_entropy, entropy_grad=entropy_grad, ignore_index=ignore_index, chunk_size=chunk_size,
        fp32_logits=fp32_logits, backend=backend, process_group=process_group, vocab_range=vocab_range,
        reduce_hidden_grad=reduce_hidden_grad)
    return (logprobs, entropy) if return_entropy else logprobs


def linear_token_outputs(hidden, weight, token_ids, *, bias=None, temperature=1.0, logit_scale=1.0, softcap=None,
                         return_entropy=False, entropy_grad=True, metrics=(), ignore_index=None, chunk_size="auto",
                         fp32_logits=False, backend="auto", process_group=None, vocab_range=None,
                         reduce_hidden_grad=True):
    """`linear_token_logprobs`'s outputs and the per-row `metrics` (names from METRICS) of the same pass:
    (log-probs, the entropy or None, {name: tensor shaped like token_ids}); is_top1 is bool, the others float32.
    The metrics are read from each chunk's logits before the kernel's pass: one more read of the chunk each
    (log_sum_sq_probs reads a float32 copy of it, one chunk-sized buffer beyond the chunk budget). An ignored row's
    metrics are 0 (is_top1 False). Over vocab shards no metric is computed (each needs its own exchange)."""
    logit_map = tempered_map(logit_scale, softcap, temperature)
    sharded = process_group is not None or vocab_range is not None
    if ignore_index is not None and (not isinstance(ignore_index, int) or isinstance(ignore_index, bool)):
        raise ValueError(f"ignore_index must be an int or None, got {ignore_index!r}")
    if not isinstance(metrics, (tuple, list, frozenset, set)) or not set(metrics) <= set(METRICS):
        raise ValueError(f"metrics must be a collection of names from {METRICS}, got {metrics!r}")
    if sharded and metrics:
        raise ValueError(f"metrics {sorted(metrics)} are not computed over vocab shards (process_group): each would "
                         "need an exchange of its own; ask for them on a whole head")
    # CE alone with weight 1 at T = 1: the kernel's PART_CE is -log q(token), PART_ENTROPY q's entropy; its rows at
    # ignore_index are all 0, their gradient too. Without one the options' default stands: the check above has
    # refused such ids (on a GPU, where it is not made, the kernels give them 0 rather than NaN).
    opts = LossOptions(kd_weight=0.0, ce_weight=1.0, reduction="none", backend=backend,
                       **({} if ignore_index is None else {"ignore_index": ignore_index}))

    def check():
        _check_inputs(hidden, weight, token_ids, bias, return_entropy, entropy_grad, ignore_index, chunk_size,
                      fp32_logits, sharded)

    # Traced by torch.compile: the chunk loops as custom ops (kdfast.token_ops); over vocab shards the eager loop
    # runs as it is (a graph break), its collectives the host's.
    if torch.compiler.is_compiling() and not sharded:
        check()
        logprobs, entropy, *values = compiled_token_outputs(hidden, weight, bias, token_ids, logit_map, chunk_size,
                                                            opts, return_entropy, entropy_grad, frozenset(metrics),
                                                            fp32_logits)
    else:
        # Over shards every rank checks its inputs, then the ranks agree on the shards and on the ids' global range.
        rows_kernel = rows_kernel_for(opts, check, lambda: weight.shape[0], hidden, token_ids, process_group,
                                      vocab_range, reduce_hidden_grad, "token_ids")
        plan = TokenPlan(logit_map, chunk_size, rows_kernel, opts, return_entropy and entropy_grad,
                         frozenset(metrics), fp32_logits)
        logprobs, entropy, *values = _apply(hidden, weight, bias, token_ids, plan)
    found = {name: value for name, value in zip(METRICS, values) if name in metrics}
    return logprobs, entropy if return_entropy else None, found


@dataclass(frozen=True)
class TokenPlan:
    """How the chunks run: the head's map (the temperature folded in), the chunk size, the rows kernel and its
    settings (CE alone)."""

    logit_map: LogitMap
    chunk_size: int | str
    rows_kernel: object
    opts: LossOptions
    # False: the entropy is not returned, or is not expected to be differentiated (the frozen head's direct d hidden)
    entropy_grad_expected: bool = True
    metrics: frozenset = frozenset()  # names from METRICS
    fp32_logits: bool = False  # the chunks' logits in float32 where the GEMMs are 16-bit

    @property
    def shard(self):
        """This rank's VocabShard when the rows kernel is a vocab shard's (kdfast.vocab_parallel.ShardedRows), else
        None."""
        return getattr(self.rows_kernel, "shard", None)


# The chunk loop is driven from the host: torch.compile calls it as is rather than tracing into it.
@torch.compiler.disable
def _apply(hidden, weight, bias, token_ids, plan):
    return TokenLogprobsFunction.apply(hidden, weight, bias, token_ids, plan)


def _check_inputs(hidden, weight, token_ids, bias, return_entropy, entropy_grad, ignore_index, chunk_size,
                  fp32_logits, sharded=False) -> None:
    _check_floating("hidden", hidden, "[..., hidden]")
    _check_floating("weight", weight, "[vocab, hidden]")
    if hidden.dim() < 1:
        raise ValueError("hidden must have shape [..., hidden], got a 0-d tensor")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1] or weight.shape[0] < 1:
        raise ValueError(f"weight must have shape [vocab, {hidden.shape[-1]}] (vocab >= 1, the hidden size of "
                         f"hidden), got {tuple(weight.shape)}")
    vocab = weight.shape[0]
    _check_bias("bias", bias, vocab)
    _check_one_device(hidden, weight, bias)
    if not isinstance(token_ids, torch.Tensor):
        raise ValueError(f"token_ids must be an integer torch.Tensor, got {type(token_ids).__name__}")
    if token_ids.dtype.is_floating_point or token_ids.dtype.is_complex or token_ids.dtype == torch.bool:
        raise ValueError(f"token_ids must be an integer tensor (int64 token ids), got dtype {token_ids.dtype}")
    if tuple(token_ids.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"token_ids shape {tuple(token_ids.shape)} must equal hidden's leading shape "
                         f"{tuple(hidden.shape[:-1])}: one token per row of hidden")
    if token_ids.device != hidden.device:
        raise ValueError(f"token_ids are on {token_ids.device} but hidden is on {hidden.device}")
    # As for labels: reading the range on a GPU is a host sync; there the kernels mark an out-of-range row NaN. Over
    # shards the ids are global: their upper bound is checked in the ranks' agreement, against the global vocabulary.
    if token_ids.numel() and _label_check_costs_no_sync(token_ids):
        bad = (token_ids < 0) | (token_ids >= vocab) if not sharded else token_ids < 0
        if ignore_index is not None:
            bad &= token_ids != ignore_index
        if bool(bad.any()):
            allowed = "" if ignore_index is None else f" or equal ignore_index={ignore_index}"
            bound = "[0, the global vocabulary)" if sharded else f"[0, {vocab}) (the vocab size of weight)"
            raise ValueError(f"token_ids must lie in {bound}{allowed}; found {token_ids[bad][0].item()}")
    for name, flag in (("return_entropy", return_entropy), ("entropy_grad", entropy_grad)):
        if not isinstance(flag, bool):
            raise ValueError(f"{name} must be True or False, got {flag!r}")
    check_chunk_settings(None, chunk_size, fp32_logits)


@dataclass
class Rows:
    """One call's inputs flattened: hidden [N, H], the head [V, H] (+ bias [V]) and the token ids [N] int64."""

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    token_ids: torch.Tensor
    gemm: torch.dtype  # the GEMMs' dtype (autocast's, or the inputs' promoted type)
    fp32_logits: bool = False

    @property
    def logits_dtype(self) -> torch.dtype:
        """The chunk's logits: float32 when asked for, else the GEMM's dtype."""
        return torch.float32 if self.fp32_logits else self.gemm

    def gemm_head(self, logits: torch.Tensor) -> torch.Tensor:
        """The head as the chunks' GEMMs take it (one cast per call; the hidden states and the gradient are cast to
        its dtype): the GEMM's, or with float32 logits on a device without a GEMM that writes them from 16-bit
        inputs, float32 of the 16-bit values (linear_chunks.gemm_weight)."""
        return gemm_weight(self.weight, self.gemm, logits)

    @property
    def count(self) -> int:
        return self.hidden.shape[0]

    @property
    def vocab(self) -> int:
        return self.weight.shape[0]


def chunk_rows(chunk_size, rows: Rows, row_bytes: int) -> int:
    """Rows per chunk: `chunk_size`, or as many as the device's budget allows at `row_bytes` per row (at least 16),
    spread evenly over the chunks that takes: no short last chunk whose GEMMs run below speed."""
    if chunk_size != "auto":
        return min(int(chunk_size), max(rows.count, 1))
    budget = CHUNK_BUDGET_BYTES.get(rows.hidden.device.type, CHUNK_BUDGET_BYTES["cpu"])
    if rows.gemm == torch.float32 and cpu_gemm.on_onednn(rows.hidden, rows.weight):
        # oneDNN's product comes beside the chunk's buffer (`_mapped_logits`): two chunk-sized blocks, so half the
        # budget each. Log-probs forward and backward at N=2048, H=256, V=32000, two threads, interleaved (2026-12-07):
        # 1167 ms in chunks of 192 rows (half), 1209 in 256, 1275 in 128 and 1449 in 94 (a quarter); the extra peak of
        # tests/test_token_logprobs.py's step 66.5-66.7 MiB live in chunks of 192 (kdfast.memory pins glibc's mmap
        # threshold; left dynamic, the heap kept freed blocks and the step once measured 137 MiB)
        budget //= 2
    most = max(16, budget // row_bytes // 16 * 16)
    if rows.count <= most:
        return max(rows.count, 1)
    chunks = -(-rows.count // most)
    return -(-rows.count // chunks)


@dataclass
class KeptChunk:
    """The forward's last chunk of logits, kept for the backward, which then skips that chunk's GEMM: it is the
    buffer the backward would allocate anyway, only allocated earlier."""

    start: int
    rows: int
    buffer: torch.Tensor  # the forward's whole chunk buffer; the chunk's logits are its first `rows` rows


class TokenLogprobsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, token_ids, plan: TokenPlan):
        ctx.set_materialize_grads(False)  # an output with no gradient (the entropy, often) costs nothing
        lead_shape = hidden.shape[:-1]
        rows = Rows(hidden.reshape(-1, hidden.shape[-1]), weight, bias, token_ids.reshape(-1).long().contiguous(),
                    gemm_dtype(hidden, weight), plan.fp32_logits)
        # The chunks' casts and GEMMs are ours: autocast must not cast them again.
        wanted = Wanted(ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2])
        # d hidden in the forward (module docstring): the head frozen and only the log-probs expected to get a gradient.
        direct = wanted.hidden and not wanted.weight and not wanted.bias and not plan.entropy_grad_expected
        # With a softcap the backward also needs the tanh, which the forward does not keep: it recomputes all.
        keep = wanted.any and plan.logit_map.softcap is None and not direct
        with torch.autocast(hidden.device.type, enabled=False):
            logprobs, entropy, kept, direction, metrics = _forward_chunks(rows, plan, keep, direct)
        logprobs, entropy = logprobs.view(lead_shape), entropy.view(lead_shape)
        metrics = [metrics[name].view(lead_shape) if name in metrics else None for name in METRICS]
        ctx.mark_non_differentiable(*(m for m in metrics if m is not None))
        if wanted.any:
            ctx.rows, ctx.plan, ctx.wanted, ctx.hidden_shape, ctx.kept = rows, plan, wanted, hidden.shape, kept
            # Saved so that autograd refuses a backward after any of them was modified in place.
            ctx.save_for_backward(hidden, weight, bias, logprobs, entropy, direction)
        return logprobs, entropy, *metrics

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy, *_metrics):
        if grad_logprobs is None and grad_entropy is None:
            return None, None, None, None, None
        _, weight, bias, logprobs, entropy, direction = ctx.saved_tensors
        flat = [g.reshape(-1).float() if g is not None else None for g in (grad_logprobs, grad_entropy)]
        if direction is not None and grad_entropy is None:
            d_hidden = direction.mul(flat[0][:, None]).to(ctx.rows.hidden.dtype)
            return d_hidden.view(ctx.hidden_shape), None, None, None, None
        # A head that learns, or an entropy differentiated after all (`entropy_grad=False` was a wrong guess; the
        # forward's direction is then not used): every chunk's logits again.
        # The kept logits are overwritten by the gradient: a second backward (retain_graph) recomputes them.
        kept, ctx.kept = ctx.kept, None
        # A ZeRO-3 head, whole in the forward (gathered by the caller), may be partitioned again by now: the
        # parameters themselves are gathered where they are (ctx.rows holds them as passed).
        with torch.autocast(logprobs.device.type, enabled=False), gathered(ctx.rows.weight, ctx.rows.bias):
            d_hidden, d_weight, d_bias = _backward_chunks(ctx.rows, ctx.plan, ctx.wanted, logprobs.reshape(-1),
                                                          entropy.reshape(-1), *flat, kept)
        return (d_hidden.view(ctx.hidden_shape) if d_hidden is not None else None,
                d_weight.to(weight.dtype) if d_weight is not None else None,
                d_bias.to(bias.dtype) if d_bias is not None else None, None, None)


def _forward_chunks(rows: Rows, plan: TokenPlan, keep: bool, direct: bool):
    """log q(token) [N] and the entropy of q [N], float32; with `keep` the last chunk's logits as a KeptChunk; with
    `direct` d hidden per unit gradient of each row's log-prob ([N, H] float32, else None); the plan's metrics
    ({name: [N]})."""
    device, logit_map = rows.hidden.device, plan.logit_map
    logprobs = torch.empty(rows.count, dtype=torch.float32, device=device)
    entropy = torch.empty(rows.count, dtype=torch.float32, device=device)
    capped = direct and logit_map.softcap is not None  # the chain rule then needs the tanh
    row_bytes = _sized_width(rows, plan) * rows.logits_dtype.itemsize * (2 if capped else 1)
    step = chunk_rows(plan.chunk_size, rows, row_bytes)
    size = (min(step, rows.count), rows.vocab)
    buffer = torch.empty(size, dtype=rows.logits_dtype, device=device)
    tanh_buffer = torch.empty(size, dtype=rows.logits_dtype, device=device) if capped else None
    direction = torch.empty(rows.hidden.shape, dtype=torch.float32, device=device) if direct else None
    metrics = {name: torch.empty(rows.count, dtype=torch.bool if name == "is_top1" else torch.float32, device=device)
               for name in plan.metrics}
    weight = rows.gemm_head(buffer)  # one cast for all chunks (a no-op when equal)
    one = torch.ones((), dtype=torch.float32, device=device)
    for start in range(0, rows.count, step):
        chunk, count = slice(start, start + step), min(step, rows.count - start)
        tanh = tanh_buffer[:count] if capped else None
        logits = _mapped_logits(buffer[:count], tanh, rows.hidden[chunk].to(rows.gemm).to(weight.dtype), weight,
                                rows.bias, logit_map).unsqueeze(0)
        # Before the kernel's pass, which may write the gradient over the logits.
        _read_metrics({name: values[chunk] for name, values in metrics.items()}, logits[0], rows.token_ids[chunk],
                      plan.opts.ignore_index)
        # Without a divergence the teacher argument is not read: the student stands in for it. With `direct` the
        # kernel writes q - onehot(token) over the logits in the pass that takes the statistics.
        parts = plan.rows_kernel(logits, logits, rows.token_ids[chunk], one, logits if direct else None, plan.opts)
        logprobs[chunk] = parts[:, PART_CE].neg()
        entropy[chunk] = parts[:, PART_ENTROPY]
        if "log_sum_sq_probs" in metrics:
            metrics["log_sum_sq_probs"][chunk] += 2.0 * logprobs[chunk]
        if direct:
            grad = logit_map.tanh_chain_(logits[0], tanh) if capped else logits[0]
            # d log q(t) / dz = -(q - onehot) times the map's slope (the softcap's chain rule has applied it).
            direction[chunk] = cpu_gemm.product(grad.to(weight.dtype), weight).float().mul_(
                -1.0 if capped else -logit_map.slope)
    kept = KeptChunk(start, logits.shape[1], buffer) if keep and rows.count else None
    if direct:  # over vocab shards each rank's direction covers its columns: the full one is their sum
        direction = plan.rows_kernel.reduce_hidden_grad(direction)
    return logprobs, entropy, kept, direction, metrics


def _backward_chunks(rows: Rows, plan: TokenPlan, wanted: Wanted, logprobs, entropy, grad_logprobs, grad_entropy,
                     kept: KeptChunk | None):
    """d hidden (hidden's dtype), d weight and d bias (float32) of sum(grad_logprobs * log q(token) + grad_entropy *
    entropy); either grad may be None (no such term). The `kept` chunk, when given, is taken first and without its
    GEMM, and its buffer then serves the other chunks."""
    device, logit_map = rows.hidden.device, plan.logit_map
    shard = plan.shard
    # Over shards each rank's d hidden is a partial sum over its columns: float32 until the ranks' sum.
    d_hidden = (torch.empty(rows.hidden.shape, dtype=rows.hidden.dtype if shard is None else torch.float32,
                            device=device) if wanted.hidden else None)
    # d weight's first chunk writes it (no pass of zeros over [V, H] first).
    d_weight = torch.empty(rows.weight.shape, dtype=torch.float32, device=device) if wanted.weight else None
    d_bias = torch.zeros(rows.vocab, dtype=torch.float32, device=device) if wanted.bias else None
    capped = logit_map.softcap is not None
    width = _sized_width(rows, plan)
    row_bytes = width * rows.logits_dtype.itemsize * (2 if capped else 1)
    if grad_entropy is not None:
        row_bytes += width * 4  # the entropy term's q log q, float32
    step = chunk_rows(plan.chunk_size, rows, row_bytes)
    size = (min(step, rows.count), rows.vocab)
    if kept is not None and (kept.rows > size[0] or kept.buffer.shape[0] < size[0]):
        kept = None  # more rows than this backward's chunks may take (the entropy's term needs room): recomputed
    # The kept chunk's buffer serves the other chunks too: the backward allocates none of its own.
    buffer = (kept.buffer[:size[0]] if kept is not None
              else torch.empty(size, dtype=rows.logits_dtype, device=device))
    tanh_buffer = torch.empty(size, dtype=rows.logits_dtype, device=device) if capped else None
    entropy_buffer = torch.empty(size, dtype=torch.float32, device=device) if grad_entropy is not None else None
    weight = rows.gemm_head(buffer)
    one = torch.ones((), dtype=torch.float32, device=device)
    # The gradient's constant factor: the map's slope without a softcap (tanh_chain_ applies it with one).
    slope = logit_map.slope if not capped else 1.0
    first = True
    for start, count in _backward_order(rows.count, step, kept):
        chunk = slice(start, start + count)
        hidden = rows.hidden[chunk].to(rows.gemm).to(weight.dtype)
        tanh = tanh_buffer[:count] if capped else None
        if kept is not None and start == kept.start:
            logits = buffer[:count]  # the forward left this chunk's logits here
        else:
            logits = _mapped_logits(buffer[:count], tanh, hidden, weight, rows.bias, logit_map)
        token_ids = rows.token_ids[chunk]
        plan.rows_kernel(logits.unsqueeze(0), logits.unsqueeze(0), token_ids, one, logits.unsqueeze(0), plan.opts)
        grad = logits  # now q - onehot(token)
        if grad_entropy is None:
            # d log q(t) / dz = -(q - onehot): the row weight joins the small side of each GEMM, not a pass over V.
            row_factor = grad_logprobs[chunk].mul(-slope)
        else:
            entropy_grads = (logprobs[chunk], entropy[chunk], _rows_or_zeros(grad_logprobs, chunk, count, device),
                             grad_entropy[chunk])
            _add_entropy_term_(grad, entropy_buffer[:count], *_token_columns(token_ids, rows.vocab, shard),
                               *entropy_grads)
            row_factor = torch.full((count,), -slope, dtype=torch.float32, device=device)
        if capped:
            logit_map.tanh_chain_(grad, tanh)
        _accumulate(grad, row_factor[:, None], hidden, weight, chunk, d_hidden, d_weight, d_bias, first)
        first = False
    if d_weight is not None and first:
        d_weight.zero_()  # no rows
    if shard is not None and d_hidden is not None:
        d_hidden = plan.rows_kernel.reduce_hidden_grad(d_hidden).to(rows.hidden.dtype)
    return d_hidden, d_weight, d_bias


def _sized_width(rows: Rows, plan: TokenPlan) -> int:
    """The columns a chunk's row is sized by: the head's, or over vocab shards the widest rank's, so that every rank
    runs the same chunks (each chunk's exchange is a collective that all of them must reach)."""
    return rows.vocab if plan.shard is None else max(plan.shard.widest, rows.vocab)


def _token_columns(token_ids, width: int, shard):
    """Each row's token as a column of this chunk's logits (clamped into [0, width): an ignored id, or over vocab
    shards a token another rank holds, reads any column) and, over shards, whether this rank holds it (else None)."""
    if shard is None:
        return token_ids.clamp(0, width - 1), None
    local = token_ids - shard.start
    held = (local >= 0) & (local < width)
    return local.clamp(0, width - 1), held


def _read_metrics(metrics: dict, logits, token_ids, ignore_index: int) -> None:
    """Writes the asked-for metrics of a chunk's rows from its mapped logits [n, V], 0 in the rows at `ignore_index`.
    log_sum_sq_probs gets LSE(2z) - 2 z_t here, what log sum q^2 = LSE(2z) - 2 LSE(z) is before LSE(z) = z_t - log
    q(t) is known: the caller adds 2 log q(t) (0 in an ignored row) after the kernel's pass. That one reads a float32
    copy of the chunk (WPO's weights alone ask for it)."""
    if not metrics:
        return
    if "is_top1" in metrics:
        torch.eq(logits.argmax(-1), token_ids, out=metrics["is_top1"])
    if "mean_logits" in metrics:
        torch.sum(logits, -1, dtype=torch.float32, out=metrics["mean_logits"]).div_(logits.shape[-1])
    if "log_sum_sq_probs" in metrics:
        doubled = logits.to(torch.float32, copy=True).mul_(2.0)
        # An ignored row's id may lie outside the vocabulary: any column serves, its value is zeroed below.
        target = doubled.gather(-1, token_ids.clamp(0, logits.shape[-1] - 1)[:, None])[:, 0]
        torch.logsumexp(doubled, -1, out=metrics["log_sum_sq_probs"]).sub_(target)
    ignored = token_ids == ignore_index  # no host read: a GPU's rows are zeroed whether any is ignored or not
    for values in metrics.values():
        values.masked_fill_(ignored, 0)


def _backward_order(count: int, step: int, kept: KeptChunk | None) -> list[tuple[int, int]]:
    """(start, rows) of the backward's chunks: the kept chunk first (its logits are in the buffer), then the rest
    by `step`."""
    if kept is None:
        return [(start, min(step, count - start)) for start in range(0, count, step)]
    head = [(kept.start, kept.rows)]
    return head + [(start, min(step, kept.start - start)) for start in range(0, kept.start, step)]


def _mapped_logits(out, tanh_out, hidden, weight, bias, logit_map: LogitMap):
    """The chunk's logits, mapped, in `out`; with a softcap the tanh is kept in `tanh_out` for the chain rule (None:
    no chain rule follows, `out` takes it). The map's constant rides in the GEMM's alpha and beta: no pass over the
    chunk for it, and 16-bit logits are rounded once rather than after the product, the bias and each factor."""
    into = tanh_out if logit_map.softcap is not None and tanh_out is not None else out
    factor = logit_map.gemm_factor
    if into.dtype != weight.dtype:  # float32 logits written by a GEMM of 16-bit inputs (CUDA), then the map's pass
        torch.mm(hidden, weight.t(), out_dtype=into.dtype, out=into)
        if bias is not None:
            into.add_(bias.to(into.dtype))
        if factor != 1.0:
            into.mul_(factor)
    elif cpu_gemm.on_onednn(into, hidden, weight):
        # oneDNN's product (kdfast.cpu_gemm) is a new tensor, with no alpha or beta: the bias and the factor follow
        # in the pass that copies it into the buffer (the kept chunk and the backward reuse that buffer)
        product = cpu_gemm.onednn_linear(hidden, weight)
        if bias is not None:
            product.add_(bias.to(product.dtype))
        torch.mul(product, factor, out=into)
    elif cpu_gemm.widened(into, hidden, weight):  # 16-bit on a CPU without 16-bit GEMMs (kdfast.cpu_gemm)
        cpu_gemm.widened_logits_into(into, hidden, weight, bias, factor)
    elif bias is not None:
        torch.addmm(bias.to(into.dtype), hidden, weight.t(), beta=factor, alpha=factor, out=into)
    elif factor == 1.0:
        torch.mm(hidden, weight.t(), out=into)
    else:  # beta 0: the buffer's old values are not read
        torch.addmm(into, hidden, weight.t(), beta=0.0, alpha=factor, out=into)
    return logit_map.cap_(into, out) if logit_map.softcap is not None else out


def _rows_or_zeros(grad, chunk, count, device):
    return grad[chunk] if grad is not None else torch.zeros(count, dtype=torch.float32, device=device)


def _add_entropy_term_(grad, scratch, columns, held, logprobs, entropy, grad_logprobs, grad_entropy) -> None:
    """grad: q - onehot(t) in, -(d / dz of g_l log q(t) + g_H H) out, before the map's chain rule. With L_j =
    log q_j + H: d log q(t) / dz_j = -(q_j - onehot_j) and dH / dz_j = -q_j L_j, so the sum is
    -(q_j (g_l + g_H H) + g_H q_j log q_j) off the token and -(q_t (g_l + g_H L_t) - g_l) at it; the caller's row factor
    supplies the minus. q_j log q_j comes from the kernel's q itself, in float32 `scratch` (0 where q_j underflowed):
    log q_j as z_j - lse lost eps |lse| at every column, 2% of a peaked row's gradient at |z / T| ~ 900. The token's
    entry is written from float32 values (L_t = log q(t) + H): (q_t - 1) (g_l + g_H L_t) + g_H L_t in the chunk's
    dtype would cancel to nothing in 16 bits. `columns`: each row's token column; `held` (over vocab shards): whether
    this rank's columns hold it, else the row keeps the formula off the token everywhere."""
    q = grad if grad.dtype == torch.float32 else scratch.copy_(grad)  # 16-bit q: its log taken in float32
    q_log_q = torch.special.xlogy(q, q, out=scratch)  # NaN at the token (q - 1 < 0): rewritten below
    grad.mul_((grad_logprobs + grad_entropy * entropy)[:, None]).add_(q_log_q.mul_(grad_entropy[:, None]))
    coefficient_t = grad_logprobs + grad_entropy * (logprobs + entropy)
    token_entry = logprobs.exp().mul_(coefficient_t).sub_(grad_logprobs)
    # A row at ignore_index: q is 0 (the kernel's gradient), its log-prob and entropy 0, so its token entry is 0; its
    # id may lie outside the vocabulary, and any column takes that 0.
    if held is not None:  # another rank's token: the column read keeps the value it has
        token_entry = torch.where(held, token_entry, grad.gather(1, columns[:, None])[:, 0].float())
    grad.scatter_(1, columns[:, None], token_entry[:, None].to(grad.dtype))


def _accumulate(grad, row_factor, hidden, weight, chunk, d_hidden, d_weight, d_bias, first: bool) -> None:
    """With G = row_factor * grad (never formed): d hidden[chunk] = G W, d W += G^T X (the `first` chunk writes
    d W), d bias += sum over rows of G."""
    if d_bias is not None:
        if grad.dtype == torch.float32:
            d_bias.addmv_(grad.t(), row_factor.view(-1))
        else:  # 16-bit: no mixed-dtype GEMV; its sums are float32 inside, rounded once per chunk
            d_bias += torch.mv(grad.t(), row_factor.view(-1).to(grad.dtype)).float()
    if grad.dtype != weight.dtype:  # float32 logits, 16-bit GEMMs (CUDA): the gradient rounded for them, after d bias
        grad = grad.to(weight.dtype)
    if d_hidden is not None:
        d_hidden[chunk] = cpu_gemm.product(grad, weight).float().mul_(row_factor)
    if d_weight is not None:
        scaled = (hidden.float() * row_factor).to(grad.dtype)
        if first and grad.dtype == d_weight.dtype:
            torch.mm(grad.t(), scaled, out=d_weight)
        else:
            if first:
                d_weight.zero_()
            _accumulate_weight_grad(d_weight, grad, scaled)
