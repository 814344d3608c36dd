"""A batch's `teacher_id` column (one teacher per example) as the multi-teacher loss's routes: which examples each
teacher model runs on, and each position's teacher, where a packed row holds several examples."""

from __future__ import annotations

import torch

from kdfast.integrations.sharding import collective_forward


def example_routes(teacher_id, count: int) -> torch.Tensor:
    """[batch] int64 teacher indices on the host from the `teacher_id` column, checked before any forward pass (the
    routed loss reads them on the host anyway)."""
    teacher_id = torch.as_tensor(teacher_id).reshape(-1)
    if teacher_id.dtype.is_floating_point or teacher_id.dtype == torch.bool:
        raise ValueError(f"the batch's teacher_id column must hold integer teacher indices, got dtype "
                         f"{teacher_id.dtype}")
    teacher_id = teacher_id.to("cpu", torch.int64)
    if teacher_id.numel():
        low, high = int(teacher_id.min()), int(teacher_id.max())
        if low < 0 or high >= count:
            raise ValueError(f"the batch's teacher_id column must index the {count} teachers (0..{count - 1}), got "
                             f"values from {low} to {high}")
    return teacher_id


def own_examples(route, index: int, teacher):
    """The examples routed to teacher `index` ([count] indices), for it to run on alone; None where it runs on all of
    them: no routing, or a forward that is a collective of sharded ranks (every rank runs it on its whole batch)."""
    if route is None or collective_forward(teacher):
        return None
    return (route == index).nonzero().flatten()


def token_routes(route, input_ids, position_ids=None) -> torch.Tensor:
    """Each position's teacher ([batch, seq], on the host): its example's. One example per row, or packed examples
    (`position_ids` restarting at 0 at each, as DataCollatorWithFlattening lays them out) numbered in row order; a
    column that counts neither is refused."""
    rows = input_ids.shape[0]
    if position_ids is None or route.numel() == rows:
        if route.numel() != rows:
            raise ValueError(f"the batch's teacher_id column has {route.numel()} entries for {rows} rows: one per "
                             f"example (packed examples need their position_ids)")
        return route[:, None].expand(input_ids.shape)
    example = (position_ids.reshape(-1).cpu() == 0).cumsum(0) - 1
    if position_ids.reshape(-1)[0] != 0 or int(example[-1]) + 1 != route.numel():
        raise ValueError(f"the batch's teacher_id column has {route.numel()} entries but its position_ids start "
                         f"{int(example[-1]) + 1} examples (positions restarting at 0 at each): one teacher_id per "
                         f"packed example")
    return route[example].reshape(input_ids.shape)
