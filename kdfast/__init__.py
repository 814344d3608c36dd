"""kdfast: fused knowledge-distillation losses for large-vocabulary language models."""

from kdfast.loss import DistillLoss, distill_loss

__all__ = ["DistillLoss", "distill_loss"]
__version__ = "0.1.0"
