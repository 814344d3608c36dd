"""Backends: each fills loss rows (and optionally the gradient) for [batch, rows, vocab] logit views.

Common signature: forward_rows(student, teacher, labels, grad_scale, grad, options) -> loss rows, with
student/teacher 3-D views whose vocab stride is 1, labels int64 [batch * rows] or None, grad_scale a
float32 scalar tensor (the reduction's factor) and grad a 3-D tensor to write (possibly the student
itself) or None.
"""
