"""Backends: each fills one phase's outputs (and optionally the gradient) for [batch, rows, vocab] logit views.

Common signature: forward_rows(student, teacher, labels, grad_scale, grad, options, call=FUSED) -> outputs, with
student/teacher 3-D views whose vocab stride is 1, labels int64 [batch * rows] (global token ids) or None,
grad_scale a float32 scalar tensor (the reduction's factor), grad a 3-D tensor to write (possibly the student
itself) or None, options the settings record, and call a kdfast.kernel_abi.PhaseCall. Outputs: the rows' loss parts
[rows, PART_COLUMNS] (FUSED), [rows, STAT_COLUMNS] (STATS, SUMS), nothing (GRADIENT).
"""
