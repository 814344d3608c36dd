"""kdfast: fused knowledge-distillation losses for large-vocabulary language models."""

import importlib

# name -> the module defining it, imported on first use: `kdfast --help` (kdfast.cli) must not wait for torch.
_EXPORTS = {"DistillLoss": "loss", "distill_loss": "loss", "LinearDistillLoss": "linear_loss",
            "linear_distill_loss": "linear_loss", "LinearSparseDistillLoss": "linear_sparse_loss",
            "linear_sparse_distill_loss": "linear_sparse_loss", "LossComponents": "reduction",
            "linear_student_distill_loss": "linear_logits_teacher",
            "LinearStudentDistillLoss": "linear_logits_teacher",
            "linear_student_multi_teacher_distill_loss": "linear_student_multi_teacher",
            "LinearStudentMultiTeacherDistillLoss": "linear_student_multi_teacher",
            "SparseDistillLoss": "sparse_loss", "sparse_distill_loss": "sparse_loss",
            "linear_token_logprobs": "token_logprobs", "multi_teacher_distill_loss": "multi_teacher",
            "MultiTeacherDistillLoss": "multi_teacher", "linear_multi_teacher_distill_loss": "linear_multi_teacher",
            "LinearMultiTeacherDistillLoss": "linear_multi_teacher", "VocabMap": "vocab_map",
            "cross_vocab_distill_loss": "cross_vocab", "linear_cross_vocab_distill_loss": "linear_cross_vocab",
            "linear_student_cross_vocab_distill_loss": "linear_cross_vocab",
            "CrossVocabDistillLoss": "cross_vocab_modules", "LinearCrossVocabDistillLoss": "cross_vocab_modules",
            "LinearStudentCrossVocabDistillLoss": "cross_vocab_modules",
            "align_tokenizations": "alignment", "TokenAlignment": "alignment", "linear_cross_entropy": "linear_ce",
            "LinearCrossEntropyLoss": "linear_ce", "cross_entropy": "logits_ce", "CrossEntropyLoss": "logits_ce",
            "patch_causal_lm": "integrations.fused_causal_lm", "EAFT": "token_scaling"}
__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)


def __dir__():
    return sorted([*globals(), *_EXPORTS])
