"""Inputs of the in-kernel mixture tests (tests/test_triton_mixture.py, tests/test_cuda_mixture.py)."""

import math

import torch


def mixture_inputs(teachers: int, divergence: str, rows: int = 6, vocab: int = 45, seed: int = 0):
    """float32 CPU (student [rows, vocab], teachers [M, rows, vocab], weights [rows, M], labels [rows]). The teachers
    have -inf columns: two in teacher 1, and (but under reverse KL, which a teacher without mass where the student has
    some makes infinite) column 7 in every teacher; the per-row weights a routing one-hot row (only teacher 0 counts
    in row 0) and a zero weight; the labels two ignored rows."""
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(rows, vocab, generator=generator) * 4
    stacked = torch.randn(teachers, rows, vocab, generator=generator) * 4
    if teachers > 1:
        stacked[1, :, [3, 20]] = -math.inf
    if divergence != "reverse_kl":
        stacked[:, :, 7] = -math.inf
    weights = torch.rand(rows, teachers, generator=generator) + 0.1
    weights[0] = 0.0
    weights[0, 0] = 1.0
    if teachers > 1:
        weights[3, 1] = 0.0
    labels = torch.randint(0, vocab, (rows,), generator=generator)
    labels[[2, 5]] = -100
    return student, stacked, weights, labels
