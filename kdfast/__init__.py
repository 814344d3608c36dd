"""kdfast: fused knowledge-distillation losses for large-vocabulary language models."""

from kdfast.linear_loss import LinearDistillLoss, linear_distill_loss
from kdfast.loss import DistillLoss, distill_loss

__all__ = ["DistillLoss", "LinearDistillLoss", "distill_loss", "linear_distill_loss"]
__version__ = "0.1.0"
