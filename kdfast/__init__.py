"""kdfast: fused knowledge-distillation losses for large-vocabulary language models."""

from kdfast.linear_loss import LinearDistillLoss, linear_distill_loss
from kdfast.linear_sparse_loss import LinearSparseDistillLoss, linear_sparse_distill_loss
from kdfast.loss import DistillLoss, distill_loss
from kdfast.reduction import LossComponents
from kdfast.sparse_loss import SparseDistillLoss, sparse_distill_loss

__all__ = ["DistillLoss", "LinearDistillLoss", "LinearSparseDistillLoss", "LossComponents", "SparseDistillLoss",
           "distill_loss", "linear_distill_loss", "linear_sparse_distill_loss", "sparse_distill_loss"]
__version__ = "0.1.0"
