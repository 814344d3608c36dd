"""The Universal Logit Distillation terms of `cross_vocab_distill_loss`, per row of aligned logits, as TRL's GOLD
computes them (`ULDLoss`): the L1 distance between the two models' probability vectors sorted in decreasing order,
zero-padded to the longer one, summed over ranks; and GOLD's hybrid, a divergence over the probability columns both
vocabularies hold (unrenormalised, each probability floored at 1e-8 as GOLD floors it) plus that sorted L1 over the
rest. The sort is the cost: on the CPU one C++ pass per row (csrc/cpu/uld_rows.cpp: the student's softmax, the
sorted L1 with most values bucketed rather than sorted, the divergence on the matched columns, the gradient through
the softmax); elsewhere torch.sort,
its gradient through the sort's permutation by autograd. Either runs on a chunk of rows, so nothing of [N, V] is
kept beyond the gradient."""

from __future__ import annotations

import torch

PROBABILITY_FLOOR = 1e-8  # GOLD's clamp of the matched probabilities under the logarithm
HYBRID_DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")


def sorted_l1(student_probs: torch.Tensor, teacher_probs: torch.Tensor) -> torch.Tensor:
    """Per row, sum_k |sort(a)_k - sort(b)_k| with both sorted in decreasing order and the narrower zero-padded."""
    a = student_probs.sort(dim=-1, descending=True).values
    b = teacher_probs.sort(dim=-1, descending=True).values
    width = max(a.shape[-1], b.shape[-1])
    a = torch.nn.functional.pad(a, (0, width - a.shape[-1]))
    b = torch.nn.functional.pad(b, (0, width - b.shape[-1]))
    return (a - b).abs().sum(-1)


DIVERGENCE_CODES = {"forward_kl": 0, "reverse_kl": 1, "jsd": 2}  # csrc/cpu/uld_rows.h, MatchedDivergence


def native_sort_available(backend: str, device: torch.device) -> bool:
    """Whether the C++ ULD rows run: CPU tensors, where the C++ backend may run and is built."""
    if device.type != "cpu" or backend not in ("auto", "cpu"):
        return False
    from kdfast.native_build import cpu_extension_or_none

    return cpu_extension_or_none() is not None


def matched_divergence(student_probs: torch.Tensor, teacher_probs: torch.Tensor, divergence: str,
                       beta: float) -> torch.Tensor:
    """Per row, GOLD's generalized JSD on probability columns (`logits_are_probs=True`): forward KL(t || s), reverse
    KL(s || t), or beta KL(t || m) + (1 - beta) KL(s || m) with m = (1 - beta) s + beta t, every probability floored
    at 1e-8 both under the log and as the weight."""
    log_s = student_probs.clamp_min(PROBABILITY_FLOOR).log()
    log_t = teacher_probs.clamp_min(PROBABILITY_FLOOR).log()
    if divergence == "forward_kl":
        terms = log_t.exp() * (log_t - log_s)
    elif divergence == "reverse_kl":
        terms = log_s.exp() * (log_s - log_t)
    else:
        log_m = torch.logaddexp(log_s + torch.log1p(torch.tensor(-beta, dtype=log_s.dtype)),
                                log_t + torch.log(torch.tensor(beta, dtype=log_t.dtype)))
        terms = beta * log_t.exp() * (log_t - log_m) + (1.0 - beta) * log_s.exp() * (log_s - log_m)
    return terms.sum(-1)


def hybrid_weights(matched: int, teacher_vocab: int, matched_weight, unmatched_weight) -> tuple[float, float]:
    """GOLD's default: the matched share of the teacher's logits, n_matched / V_t, and the rest."""
    if matched_weight is None and unmatched_weight is None:
        share = matched / max(1, teacher_vocab)
        return share, 1.0 - share
    if matched_weight is None or unmatched_weight is None:
        raise ValueError("matched_weight and unmatched_weight go together (both None: GOLD's matched share)")
    for name, value in (("matched_weight", matched_weight), ("unmatched_weight", unmatched_weight)):
        if not float(value) >= 0.0:
            raise ValueError(f"{name} must be a number >= 0, got {value!r}")
    return float(matched_weight), float(unmatched_weight)


class UldTerms:
    """The chunk math of method "uld" or "hybrid" for one vocabulary map: row losses from the chunk's student
    logits and teacher probabilities, by the C++ pass (`native_rows`) or with autograd (`row_losses`)."""

    def __init__(self, method: str, vocab_map, student_vocab: int, teacher_vocab: int, divergence: str, beta: float,
                 student_temperature: float, teacher_temperature: float, matched_weight, unmatched_weight, device,
                 native: bool = False):
        self.method, self.divergence, self.beta, self.native = method, divergence, beta, native
        self._probs = None  # the teacher's probabilities of a chunk (`teacher_probs`), one buffer for every chunk
        self.student_temperature, self.teacher_temperature = student_temperature, teacher_temperature
        self.weights = (1.0, 1.0)
        self.columns = (None, None, None, None)
        if method == "hybrid":
            student_ids, teacher_ids = vocab_map.student_ids.to(device), vocab_map.teacher_ids.to(device)
            self.student_matched, self.teacher_matched = student_ids.contiguous(), teacher_ids.contiguous()
            self.student_rest = complement_columns(student_ids, student_vocab, device)
            self.teacher_rest = complement_columns(teacher_ids, teacher_vocab, device)
            self.weights = hybrid_weights(teacher_ids.numel(), teacher_vocab, matched_weight, unmatched_weight)
            # The C++ pass takes the pairs in the teacher's column order: it gathers from the teacher's row, which
            # comes from memory, in one sweep, and from the student's, which it has just read, at random.
            by_teacher = torch.argsort(self.teacher_matched)
            self.columns = (self.student_matched[by_teacher].contiguous(),
                            self.teacher_matched[by_teacher].contiguous(), self.student_rest, self.teacher_rest)

    def teacher_probs(self, teacher_logits: torch.Tensor) -> torch.Tensor:
        """softmax(teacher_logits / T_t) of a chunk, into one buffer that every chunk of the call reuses (valid until
        the next chunk's): a fresh [chunk, V_t] tensor per chunk had the OS zero its pages every time (perf of a ULD
        loop on the CPU: page clearing 10.1% of its samples before, 7.4% after)."""
        logits = teacher_logits.float()
        if logits.device.type != "cpu":  # a GPU's caching allocator hands the same memory back anyway
            return torch.softmax(logits / self.teacher_temperature if self.teacher_temperature != 1.0 else logits,
                                 dim=-1)
        buffer = self._probs
        if buffer is None or buffer.shape[0] < logits.shape[0] or buffer.shape[1:] != logits.shape[1:]:
            buffer = self._probs = torch.empty(logits.shape, dtype=torch.float32)
        probs = buffer[:logits.shape[0]]
        if self.teacher_temperature != 1.0:  # the CPU's softmax reads each element before writing it: in place is safe
            logits = torch.div(logits, self.teacher_temperature, out=probs)
        return torch.ops.aten._softmax.out(logits, -1, False, out=probs)

    def native_rows(self, student_logits, teacher_probs, student_log_mass, row_scale, grad, mass_grad,
                    grad_scale: float, accumulate: bool):
        """(loss [C], entropy [C], split [C, 2]: the hybrid's matched and unmatched parts unweighted, [C, 0] for
        plain ULD) by the C++ pass; grad_scale * row_scale times the gradient written (or added) into `grad`
        (float32 [C, V_s]) and the log-mass's into `mass_grad` [C]."""
        settings = [1.0 / self.student_temperature, self.beta, *self.weights, grad_scale]
        return torch.ops.kdfast_cpu.uld_rows(
            student_logits.float().contiguous(), teacher_probs.contiguous(), student_log_mass, row_scale,
            *self.columns, grad, mass_grad, DIVERGENCE_CODES[self.divergence], settings, accumulate)

    def row_losses(self, student_logits: torch.Tensor, teacher_probs: torch.Tensor, student_log_mass=None):
        """For a chunk: (the rows' divergence [C], the student's entropy at its temperature [C], and for the hybrid
        its matched and unmatched parts before their weights [C, 2], detached, None for plain ULD). A group of merged
        tokens scales its row's probabilities by exp(student_log_mass) [C] (GOLD's unnormalised merge); the entropy
        is the row's own."""
        log_q = torch.log_softmax(student_logits.float() / self.student_temperature, dim=-1)
        q = log_q.exp()
        entropy = -(q * log_q).sum(-1).detach()
        if student_log_mass is not None:
            q = q * student_log_mass.exp()[:, None]
        if self.method == "uld":
            return sorted_l1(q, teacher_probs), entropy, None
        matched = matched_divergence(q[:, self.student_matched], teacher_probs[:, self.teacher_matched],
                                     self.divergence, self.beta)
        rest = (sorted_l1(q[:, self.student_rest], teacher_probs[:, self.teacher_rest])
                if self.student_rest.numel() and self.teacher_rest.numel() else torch.zeros_like(matched))
        matched_weight, rest_weight = self.weights
        split = torch.stack([matched.detach(), rest.detach()], dim=-1)
        return matched_weight * matched + rest_weight * rest, entropy, split


def complement_columns(ids: torch.Tensor, width: int, device) -> torch.Tensor:
    keep = torch.ones(width, dtype=torch.bool, device=device)
    keep[ids] = False
    return keep.nonzero().squeeze(1)
