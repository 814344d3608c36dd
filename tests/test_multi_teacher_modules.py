"""The `nn.Module` forms of the multi-teacher losses (`MultiTeacherDistillLoss`, `LinearMultiTeacherDistillLoss`,
`LinearStudentMultiTeacherDistillLoss`): each equals its function with the same settings, weights fixed at
construction or given per batch to `forward` (which then wins), a bad setting fails where the module is built, and the
settings show in the repr."""

import pytest
import torch

import kdfast

SETTINGS = dict(divergence="reverse_kl", temperature=2.0, ce_weight=0.4)
ROWS, VOCAB = (3, 5), 23


def inputs(seed=0):
    generator = torch.Generator().manual_seed(seed)
    data = {"hidden": torch.randn(*ROWS, 6, generator=generator), "weight": torch.randn(VOCAB, 6, generator=generator),
            "teacher_hidden": [torch.randn(*ROWS, size, generator=generator) for size in (4, 7)],
            "teacher_weight": [torch.randn(VOCAB, size, generator=generator) for size in (4, 7)],
            "labels": torch.randint(0, VOCAB, ROWS, generator=generator),
            "rows": torch.rand(*ROWS, 2, generator=generator) + 0.1}
    data["student"] = data["hidden"] @ data["weight"].t()
    data["teachers"] = [h @ w.t() for h, w in zip(data["teacher_hidden"], data["teacher_weight"])]
    return data


def forms(data):
    """(module class, its call's positional inputs, the function) of each form."""
    return [(kdfast.MultiTeacherDistillLoss, (data["student"], data["teachers"]), kdfast.multi_teacher_distill_loss),
            (kdfast.LinearMultiTeacherDistillLoss,
             (data["hidden"], data["weight"], data["teacher_hidden"], data["teacher_weight"]),
             kdfast.linear_multi_teacher_distill_loss),
            (kdfast.LinearStudentMultiTeacherDistillLoss, (data["hidden"], data["weight"], data["teachers"]),
             kdfast.linear_student_multi_teacher_distill_loss)]


@pytest.mark.parametrize("form", [0, 1, 2])
def test_each_module_equals_its_function(form):
    data = inputs()
    module_class, args, function = forms(data)[form]
    module = module_class(weights=[1.0, 3.0], combine="average", **SETTINGS)
    torch.testing.assert_close(module(*args, data["labels"]),
                               function(*args, data["labels"], weights=[1.0, 3.0], combine="average", **SETTINGS))
    # A batch's weights given to forward take the place of the module's.
    torch.testing.assert_close(module(*args, data["labels"], weights=data["rows"]),
                               function(*args, data["labels"], weights=data["rows"], combine="average", **SETTINGS))
    assert "combine='average'" in repr(module) and "weights=[1.0, 3.0]" in repr(module)
    assert "divergence='reverse_kl'" in repr(module)


@pytest.mark.parametrize("form", [0, 1, 2])
def test_a_bad_setting_fails_where_the_module_is_built(form):
    module_class = forms(inputs())[form][0]
    with pytest.raises(ValueError, match="combine must be one of"):
        module_class(combine="sum")
    with pytest.raises(TypeError, match="unknown loss setting"):
        module_class(temprature=2.0)
    with pytest.raises(ValueError, match="temperature"):
        module_class(temperature=0.0)
    if form:
        with pytest.raises(ValueError, match="chunk_size"):
            module_class(chunk_size=0)


def test_components_per_teacher_through_the_module():
    data = inputs()
    module = kdfast.MultiTeacherDistillLoss(return_components=True, **SETTINGS)
    loss, parts = module(data["student"], torch.stack(data["teachers"]), data["labels"])
    expected, expected_parts = kdfast.multi_teacher_distill_loss(data["student"], data["teachers"], data["labels"],
                                                                 return_components=True, **SETTINGS)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(parts.teachers, expected_parts.teachers)
