"""The GEMM floor of a fused linear loss: its products alone (each model's logits, the student's d hidden and d
weight), with nothing between them.

On a GPU the products run whole-size, as the GEMMs every method pays. On the CPU they run in the row chunks that
kdfast's `chunk_size="auto"` takes for the same heads and on the library it takes them from (kdfast.cpu_gemm): oneDNN's
products there run fastest while a chunk's logits stay in the cache (2026-12-05, a 2-core Zen 5: the whole-size
products took 1971 ms where kdfast's whole loss in chunks took 942), so a whole-size floor would sit above the loss it
bounds. The floor is then kdfast's own call less its loss kernel: what it costs beyond its products.
"""

from __future__ import annotations

import torch

from kdfast import cpu_gemm
from kdfast.linear_chunks import Heads, TeacherHead, chunk_rows
from kdfast.linear_teachers import TeacherHeads
from kdfast.logit_maps import LogitMap


def auto_chunk_rows(student_hidden, student_weight, teacher_hidden: list, teacher_weight: list) -> int:
    """The rows of kdfast's auto chunk for these float heads (one teacher, or several)."""
    dtype = student_hidden.dtype
    teachers = [TeacherHead(x, w, None, dtype) for x, w in zip(teacher_hidden, teacher_weight)]
    teacher = teachers[0] if len(teachers) == 1 else TeacherHeads(
        teachers, torch.zeros(student_hidden.shape[0], len(teachers)), "mixture", 1.0)
    heads = Heads(student_hidden, student_weight, None, teacher, None, LogitMap(), dtype)
    return chunk_rows("auto", heads)


def gemm_floor(student_hidden, student_weight, teacher_hidden: list, teacher_weight: list):
    """A zero-argument call running the products alone: in kdfast's auto chunks on the CPU, whole-size on a GPU."""
    rows = student_hidden.shape[0]
    step = rows if student_hidden.is_cuda else auto_chunk_rows(student_hidden, student_weight, teacher_hidden,
                                                                teacher_weight)

    def products():
        grad_weight = torch.zeros(student_weight.shape, dtype=torch.float32, device=student_weight.device)
        for start in range(0, rows, step):
            hidden = student_hidden[start:start + step]
            for x, w in zip(teacher_hidden, teacher_weight):
                cpu_gemm.logits(x[start:start + step], w)
            student = cpu_gemm.logits(hidden, student_weight)  # standing in for its gradient below
            cpu_gemm.product(student, student_weight)
            if student.dtype == grad_weight.dtype:
                grad_weight.addmm_(student.t(), hidden)
            else:  # 16-bit heads: the product, summed in float32 as kdfast sums it
                grad_weight += (student.t() @ hidden).float()
        return grad_weight

    return products
