"""Each row routed to one of several teachers: `weights=` an integer tensor [...] (the row's teacher index), the same
loss as its one-hot weights [..., M]. In the fused linear form only the row's own teacher head runs on it, so a routed
batch costs one teacher's GEMMs, not M; and a teacher's hidden states may hold its own rows alone ([n_m, H_m], in row
order), so that a trainer runs each teacher model only on the examples routed to it."""

from __future__ import annotations

from dataclasses import dataclass

import torch


def is_routing(weights, lead_shape: tuple) -> bool:
    """An integer tensor of the rows' leading shape: each row's teacher index (also where the rows are as many as the
    teachers: static weights are a list or a floating tensor then)."""
    return (isinstance(weights, torch.Tensor) and not weights.dtype.is_floating_point and not weights.dtype.is_complex
            and weights.dtype != torch.bool and tuple(weights.shape) == tuple(lead_shape))


def check_route_values(route: torch.Tensor, count: int) -> None:
    if route.numel() and (int(route.min()) < 0 or int(route.max()) >= count):
        raise ValueError(f"weights as each row's teacher (an integer tensor of the rows' shape) must index the "
                         f"{count} teachers (0..{count - 1}), got values from {int(route.min())} to {int(route.max())}")


def routing_log_weights(route: torch.Tensor, count: int, device, check: bool) -> torch.Tensor:
    """[rows, M] log-weights of the routing: 0 at the row's teacher, -inf elsewhere (its one-hot's). `check`: the
    values are read on the host (free on the CPU; a GPU's one_hot asserts on the device instead)."""
    if check:
        check_route_values(route, count)
    one_hot = torch.nn.functional.one_hot(route.reshape(-1).to(device=device, dtype=torch.int64), count)
    return torch.where(one_hot.bool(), 0.0, -torch.inf).float()


@dataclass(frozen=True)
class Routing:
    """A routing on the host: each row's teacher [N] and its row in that teacher's hidden states [N] (its own index
    where the teacher holds every row, its rank among the teacher's rows where it holds only those)."""

    teacher: torch.Tensor  # [N] int64, CPU
    slot: torch.Tensor  # [N] int64, CPU
    device_teacher: torch.Tensor  # [N] int64 on the rows' device (each row's column of the per-teacher table)

    def runs(self, start: int, stop: int) -> list[tuple[int, int, int, int]]:
        """The rows [start, stop) as maximal runs of one teacher: (teacher, first row, end row, first slot); a run's
        slots are consecutive, so each run is one GEMM over a slice of that teacher's hidden states."""
        teachers = self.teacher[start:stop]
        edges = [0, *((teachers[1:] != teachers[:-1]).nonzero().flatten() + 1).tolist(), stop - start]
        return [(int(teachers[a]), start + a, start + b, int(self.slot[start + a])) for a, b in zip(edges, edges[1:])
                if b > a]


def host_routing(route: torch.Tensor, count: int, hidden_rows: list[int], device) -> Routing:
    """The routing of `route` (each row's teacher, any integer tensor) for teachers whose hidden states hold
    `hidden_rows[m]` rows each: every row (N), or only the rows routed to m (checked against the route)."""
    teacher = route.detach().reshape(-1).to("cpu", torch.int64)  # one copy to the host per call
    check_route_values(teacher, count)
    rows = teacher.numel()
    counts = torch.bincount(teacher, minlength=count).tolist()
    slot = torch.arange(rows)
    for index, held in enumerate(hidden_rows):
        if held == rows:
            continue  # every row: its own index
        if held != counts[index]:
            raise ValueError(f"teacher_hidden[{index}] holds {held} rows: it must hold every row ({rows}) or only "
                             f"the {counts[index]} rows routed to teacher {index}")
        mine = teacher == index
        slot[mine] = torch.arange(counts[index])
    return Routing(teacher, slot, teacher.to(device))
