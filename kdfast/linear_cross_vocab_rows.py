"""The rows of `linear_cross_vocab_distill_loss`, shared by its eager Function and its custom op
(`kdfast.linear_cross_vocab_ops`): a `HeadRows` makes a chunk's logits by a GEMM of the hidden rows it is asked for
(aligned groups gather them) and takes their gradient back through the head (`GivenRows`: a teacher's given logits);
the plan of a pass over two heads."""

from __future__ import annotations

import torch

from kdfast import cpu_gemm
from kdfast.alignment import TokenAlignment
from kdfast.cross_vocab_function import cross_vocab_plan
from kdfast.cross_vocab_rows import CrossVocabPlan
from kdfast.linear_chunks import TeacherLogits
from kdfast.logit_maps import LogitMap
from kdfast.options import LossOptions


class HeadRows:
    """Rows of `hidden @ weight.T + bias`, mapped by the head's `LogitMap`, float32; their gradient into d hidden
    (float32 [N, H], rows added at their indices), d weight and d bias (float32 sums). The last rows read are the
    ones `commit` takes back (the loop reads a chunk, then commits its gradient)."""

    def __init__(self, hidden, weight, bias, logit_map: LogitMap, wanted=(False, False, False), row_weights=None):
        # row_weights [N] (reduction "none"): each row's gradient times its loss row's grad_output before the GEMMs.
        self.hidden, self.logit_map, self.row_weights = hidden, logit_map, row_weights
        self.weight = weight.float()
        self.bias = bias.float() if bias is not None else None
        self.width, self.count = weight.shape[0], hidden.shape[0]
        want_hidden, want_weight, want_bias = wanted
        self.d_hidden = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if want_hidden else None
        self.d_weight = torch.zeros_like(self.weight) if want_weight else None
        self.d_bias = torch.zeros_like(self.bias) if want_bias and bias is not None else None
        self._rows = self._uncapped = None

    def read(self, index) -> torch.Tensor:
        rows = self.hidden[index] if isinstance(index, slice) else self.hidden.index_select(0, index)
        self._rows = rows.float()
        logits = (torch.addmm(self.bias, self._rows, self.weight.t()) if self.bias is not None
                  else cpu_gemm.logits(self._rows, self.weight))
        if self.logit_map.softcap is not None:
            self._uncapped = logits
            return self.logit_map.capped_into(logits, torch.empty_like(logits))
        return self.logit_map.apply_(logits)

    def grad_buffer(self, index, count: int, may_overwrite: bool = False) -> torch.Tensor:
        return torch.empty(count, self.width, dtype=torch.float32, device=self.hidden.device)

    def commit(self, index, grad: torch.Tensor) -> None:
        if self.row_weights is not None:
            weights = self.row_weights[index] if isinstance(index, slice) else self.row_weights.index_select(0, index)
            grad.mul_(weights[:, None])
        grad = self.logit_map.chain_(grad, self._uncapped)
        if self.d_hidden is not None:
            if isinstance(index, slice):
                self.d_hidden[index] += cpu_gemm.product(grad, self.weight)
            else:
                self.d_hidden.index_add_(0, index, cpu_gemm.product(grad, self.weight))
        if self.d_weight is not None:
            self.d_weight.addmm_(grad.t(), self._rows)
        if self.d_bias is not None:
            self.d_bias += grad.sum(0)


def head_rows_plan(settings, opts: LossOptions, student: HeadRows, teacher: HeadRows, device) -> CrossVocabPlan:
    method, vocab_map, alignment, teacher_temperature, matched_weight, unmatched_weight, _, chunk = settings
    return cross_vocab_plan(method, vocab_map, alignment if isinstance(alignment, TokenAlignment) else None,
                            teacher_temperature, matched_weight, unmatched_weight, opts, student.width, teacher.width,
                            device, chunk)


class GivenRows:
    """Rows of a teacher given as its logits [..., V_t] (final: no map), float32, read a chunk at a time: a view such
    as `logits[:, :-1]` is never copied whole (`linear_chunks.TeacherLogits`); gathered rows by their index into the
    leading dimensions. A constant: no gradient is committed."""

    def __init__(self, logits: torch.Tensor):
        self.logits = TeacherLogits(logits)
        self.width, self.count = logits.shape[-1], self.logits.row_count

    def read(self, index) -> torch.Tensor:
        rows = self.logits.rows(index, self.width) if isinstance(index, slice) else self.logits.rows_at(index)
        return rows.float()


def head_rows(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, maps,
              wanted=(False, False, False), row_weights=None) -> tuple[HeadRows, HeadRows | GivenRows]:
    """Both models' rows; a teacher with no head (`teacher_weight` None) given as its logits in `teacher_hidden`."""
    teacher = (GivenRows(teacher_hidden) if teacher_weight is None else
               HeadRows(teacher_hidden.reshape(-1, teacher_hidden.shape[-1]), teacher_weight, teacher_bias, maps[1]))
    return (HeadRows(student_hidden.reshape(-1, student_hidden.shape[-1]), student_weight, student_bias, maps[0],
                     wanted, row_weights), teacher)
