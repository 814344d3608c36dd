"""A loss and its gradients against a float64 reference, for the cross-entropy's weighing tests (class weights, token
scaling)."""

import torch
import torch.nn.functional as F

V = 53


def check_against_reference(out, reference, leaves, reference_leaves, upstream, atol=2e-6):
    """`out` equals `reference` (float64) and, after both take `upstream`, each leaf's gradient its reference's."""
    torch.testing.assert_close(out.double(), reference.detach(), atol=atol, rtol=1e-5)
    out.backward(upstream.to(out.dtype))
    reference.backward(upstream.double())
    for leaf, reference_leaf in zip(leaves, reference_leaves):
        torch.testing.assert_close(leaf.grad.double().cpu(), reference_leaf.grad, atol=atol, rtol=1e-4)


def weighted_ce_inputs(shape=(3, 11), vocab=V, seed=0, dtype=torch.float32):
    """Logits randn * 3, labels with every fourth ignored, class weights rand * 2."""
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(*shape, vocab, generator=gen) * 3).to(dtype)
    labels = torch.randint(0, vocab, shape, generator=gen)
    labels.view(-1)[::4] = -100
    class_weights = torch.rand(vocab, generator=gen) * 2
    return logits, labels, class_weights


def weighted_ce_reference(logits, labels, class_weights, reduction="mean", label_smoothing=0.0, z_loss_weight=0.0,
                          num_items_in_batch=None, ignore_index=-100, row_factors=None):
    """torch's (weighted, where `class_weights` is not None) CE of [..., V] logits plus z_loss_weight * lse^2 over
    the kept rows, each row times its `row_factors` [N] where given; "mean" over the kept rows' label weights (their
    count for the z-loss, and without weights), or both over num_items_in_batch."""
    flat, flat_labels = logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)
    kept = flat_labels != ignore_index
    ce = F.cross_entropy(flat, flat_labels, weight=class_weights, ignore_index=ignore_index,
                         label_smoothing=label_smoothing, reduction="none")
    z_rows = torch.where(kept, z_loss_weight * torch.logsumexp(flat, -1) ** 2, 0.0)
    if row_factors is not None:
        ce, z_rows = ce * row_factors, z_rows * row_factors
    if reduction == "none":
        return (ce + z_rows).view(labels.shape)
    if reduction == "sum":
        return ce.sum() + z_rows.sum()
    if num_items_in_batch is not None:
        return (ce.sum() + z_rows.sum()) / num_items_in_batch
    weights = kept.sum() if class_weights is None else class_weights[flat_labels[kept]].sum()
    return ce.sum() / weights + z_rows.sum() / kept.sum()
