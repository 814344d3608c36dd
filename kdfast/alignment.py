"""Which rows of a teacher of another tokenizer go with which rows of the student: `align_tokenizations`, the
text-span alignment of TRL's GOLD. Both sides' tokens are walked by the byte offsets where they end; a group closes
where both end at one byte (the places the two tokenizers agree on a split), so a word one side holds as one token
and the other as three is one group of 1 and 3 tokens.

A group of several tokens is one distribution, merged as GOLD merges it: its base row's probabilities times the
probabilities of the group's other tokens (each floored at 1e-8), so the merged row is unnormalised. "observed"
takes the first token's row as the base (the later tokens are multiplied in), "bayesian" the last token's (the
earlier ones, the chain rule). The alignment holds rows and ids only; the loss (`cross_vocab_distill_loss` with
`alignment=`) reads the rows' logits and merges in its pass, so no aligned [G, V] copy is made."""

from __future__ import annotations

from dataclasses import dataclass

import torch

MERGES = ("observed", "bayesian")


@dataclass(frozen=True)
class SideRows:
    """One model's rows of an alignment: `base` [G] the row of each group's distribution; `extra_rows` [E],
    `extra_ids` [E] and `extra_groups` [E] the rows, token ids and groups of the tokens multiplied in."""

    base: torch.Tensor
    extra_rows: torch.Tensor
    extra_ids: torch.Tensor
    extra_groups: torch.Tensor

    def groups_from(self, first_group: int) -> SideRows:
        """The same rows, their groups numbered from `first_group` (a sample's place in a joined batch)."""
        return SideRows(self.base, self.extra_rows, self.extra_ids, self.extra_groups + first_group)

    def to(self, device) -> SideRows:
        return SideRows(*(tensor.to(device) for tensor in (self.base, self.extra_rows, self.extra_ids,
                                                           self.extra_groups)))

    def check_rows(self, name: str, rows: int) -> None:
        for what, ids in (("a group's row", self.base), ("a merged token's row", self.extra_rows)):
            if ids.numel() and int(ids.max()) >= rows:
                raise ValueError(f"alignment names {what} {int(ids.max())} but {name} has {rows} rows (flattened "
                                 "[..., V]): align with the rows of these logits")

    def check_ids(self, name: str, vocab: int) -> None:
        if self.extra_ids.numel() and int(self.extra_ids.max()) >= vocab:
            raise ValueError(f"alignment merges token id {int(self.extra_ids.max())} but {name} has {vocab} columns")


@dataclass(frozen=True)
class TokenAlignment:
    """G aligned groups: `student` and `teacher` rows (`SideRows`), `sample` [G] the sample each group came from
    (0 for one sequence; the index in the list for `TokenAlignment.cat`)."""

    student: SideRows
    teacher: SideRows
    sample: torch.Tensor

    @property
    def groups(self) -> int:
        return self.sample.numel()

    @property
    def student_rows(self) -> torch.Tensor:
        return self.student.base

    @property
    def teacher_rows(self) -> torch.Tensor:
        return self.teacher.base

    def __repr__(self) -> str:
        return (f"TokenAlignment({self.groups} groups, {self.student.extra_rows.numel()} student and "
                f"{self.teacher.extra_rows.numel()} teacher tokens merged in)")

    def to(self, device) -> TokenAlignment:
        return TokenAlignment(self.student.to(device), self.teacher.to(device), self.sample.to(device))

    @classmethod
    def cat(cls, alignments) -> TokenAlignment:
        """One alignment of several samples' (their rows already index one flattened batch of logits)."""
        alignments = list(alignments)
        if not alignments:
            raise ValueError("alignments must hold at least one TokenAlignment")
        sides, starts = {"student": [], "teacher": []}, 0
        samples = []
        for index, alignment in enumerate(alignments):
            for name in sides:
                sides[name].append(getattr(alignment, name).groups_from(starts))
            samples.append(torch.full_like(alignment.sample, index))
            starts += alignment.groups
        joined = {name: SideRows(*(torch.cat([getattr(side, field) for side in parts]) for field in
                                   ("base", "extra_rows", "extra_ids", "extra_groups")))
                  for name, parts in sides.items()}
        return cls(joined["student"], joined["teacher"], torch.cat(samples))


def align_tokenizations(student_ids, student_offsets, teacher_ids, teacher_offsets, *, student_rows=None,
                        teacher_rows=None, merge="observed", strict=True) -> TokenAlignment:
    """The groups of one sequence: `*_ids` [S] the tokens (the ids a merge multiplies in), `*_offsets` [S, 2] their
    (start, end) byte spans in one text (only the ends are read), `*_rows` [S] the row of the logits holding the
    distribution for each token (default 0..S-1; GOLD's "bayesian" reads the row before the token's; a causal LM's
    row for token k is k - 1, and with "observed" its merges are then exact chain-rule products). Row -1 marks a
    token no row predicts: its group is dropped. `strict` refuses spans that do not end at the same byte; with
    strict=False the tokens left over make one last group, as GOLD does. Groups with no token on one side are
    dropped (GOLD drops them)."""
    if merge not in MERGES:
        raise ValueError(f"merge must be one of {MERGES}, got {merge!r}")
    student_ids, student_ends, student_rows = _side("student", student_ids, student_offsets, student_rows)
    teacher_ids, teacher_ends, teacher_rows = _side("teacher", teacher_ids, teacher_offsets, teacher_rows)
    if strict and student_ends and teacher_ends and student_ends[-1] != teacher_ends[-1]:
        raise ValueError(f"student_offsets end at byte {student_ends[-1]} and teacher_offsets at byte "
                         f"{teacher_ends[-1]}: the two tokenizations must cover the same text (strict=False "
                         "aligns what they share and puts the rest in one last group, as GOLD does)")
    # A token no logits row predicts (row -1: the first token of a causal LM's window) leaves its group unscorable.
    student_unread = {k for k, row in enumerate(student_rows.tolist()) if row < 0}
    teacher_unread = {k for k, row in enumerate(teacher_rows.tolist()) if row < 0}
    pairs = [(s, t) for s, t in zip(*_groups_by_ends(student_ends, teacher_ends))
             if s and t and not (student_unread.intersection(s) or teacher_unread.intersection(t))]
    student = _side_rows([s for s, _ in pairs], student_ids, student_rows, merge)
    teacher = _side_rows([t for _, t in pairs], teacher_ids, teacher_rows, merge)
    return TokenAlignment(student, teacher, torch.zeros(len(pairs), dtype=torch.int64))


def _side(name: str, ids, offsets, rows):
    ids = torch.as_tensor(ids, dtype=torch.int64).reshape(-1)
    offsets = torch.as_tensor(offsets)
    if offsets.dim() != 2 or offsets.shape != (ids.numel(), 2) or offsets.is_floating_point():
        raise ValueError(f"{name}_offsets must be integers [S, 2] (start, end) for the {ids.numel()} "
                         f"{name}_ids, got {tuple(offsets.shape)} {offsets.dtype}")
    ends = offsets[:, 1].tolist()
    if any(later < earlier for earlier, later in zip(ends, ends[1:])):
        raise ValueError(f"{name}_offsets must end in increasing byte order (the tokens of one text in order)")
    rows = torch.arange(ids.numel()) if rows is None else torch.as_tensor(rows, dtype=torch.int64).reshape(-1)
    if rows.numel() != ids.numel():
        raise ValueError(f"{name}_rows must hold one row per token ({ids.numel()}), got {rows.numel()}")
    if rows.numel() and int(rows.min()) < -1:
        raise ValueError(f"{name}_rows must be rows of the flattened logits (>= 0) or -1 for a token no row "
                         f"predicts, got {int(rows.min())}")
    return ids, ends, rows


def _groups_by_ends(student_ends: list, teacher_ends: list):
    """GOLD's walk: advance the side whose token ends earlier; both ending at one byte closes a group."""
    student_groups, teacher_groups = [], []
    s = t = s_start = t_start = 0
    while s < len(student_ends) and t < len(teacher_ends):
        if student_ends[s] < teacher_ends[t]:
            s += 1
        elif student_ends[s] > teacher_ends[t]:
            t += 1
        else:
            s, t = s + 1, t + 1
            student_groups.append(range(s_start, s))
            teacher_groups.append(range(t_start, t))
            s_start, t_start = s, t
    if s < len(student_ends) or t < len(teacher_ends):
        student_groups.append(range(s_start, len(student_ends)))
        teacher_groups.append(range(t_start, len(teacher_ends)))
    return student_groups, teacher_groups


def _side_rows(groups: list, ids: torch.Tensor, rows: torch.Tensor, merge: str) -> SideRows:
    base, extra, extra_groups = [], [], []
    for index, group in enumerate(groups):
        members = list(group)
        anchor = members[0] if merge == "observed" else members[-1]
        base.append(anchor)
        for position in members:
            if position != anchor:
                extra.append(position)
                extra_groups.append(index)
    extra = torch.tensor(extra, dtype=torch.int64)
    return SideRows(rows[torch.tensor(base, dtype=torch.int64)], rows[extra], ids[extra],
                    torch.tensor(extra_groups, dtype=torch.int64))


def check_alignment(alignment, rows: tuple, vocabs: tuple, names: tuple) -> None:
    """A TokenAlignment whose rows and merged ids lie in both models' (rows, vocabulary)."""
    if not isinstance(alignment, TokenAlignment):
        raise ValueError(f"alignment must be a kdfast.TokenAlignment (kdfast.align_tokenizations), got "
                         f"{type(alignment).__name__}")
    if torch.compiler.is_compiling():  # values are read where the rows are (kdfast.cross_vocab_ops checks there)
        return
    for name, side, count, vocab in zip(names, (alignment.student, alignment.teacher), rows, vocabs):
        side.check_rows(name, count)
        side.check_ids(name, vocab)
