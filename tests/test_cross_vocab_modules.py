"""The `nn.Module` forms of the cross-vocabulary losses (`CrossVocabDistillLoss`, `LinearCrossVocabDistillLoss`,
`LinearStudentCrossVocabDistillLoss`): each equals its function with the same settings, with and without a batch's
alignment; a bad setting (an unknown name, a method that refuses the divergence, a map that is not one, a bad chunk
size or softcap) fails where the module is built; the settings show in the repr."""

import pytest
import torch
from small_vocab_map import STUDENT_VOCAB, small_vocab_map
from test_linear_cross_vocab import alignment, heads, logits_of

import kdfast

SETTINGS = dict(method="hybrid", divergence="jsd", beta=0.3, temperature=1.5, teacher_temperature=0.8,
                ce_weight=0.4)
PLAIN = ((1.0, None), (1.0, None))


@pytest.fixture(scope="module")
def vocab_map():
    return small_vocab_map()


def forms(tensors, teacher_logits):
    """(module class, its forward's positional inputs, the function) of each form."""
    student_logits = logits_of(tensors, PLAIN)[0]
    return [(kdfast.CrossVocabDistillLoss, (student_logits, teacher_logits), kdfast.cross_vocab_distill_loss),
            (kdfast.LinearCrossVocabDistillLoss,
             (tensors["student_hidden"], tensors["student_weight"], tensors["teacher_hidden"],
              tensors["teacher_weight"]), kdfast.linear_cross_vocab_distill_loss),
            (kdfast.LinearStudentCrossVocabDistillLoss,
             (tensors["student_hidden"], tensors["student_weight"], teacher_logits),
             kdfast.linear_student_cross_vocab_distill_loss)]


@pytest.mark.parametrize("form", [0, 1, 2])
@pytest.mark.parametrize("aligned", [False, True])
def test_each_module_equals_its_function(vocab_map, form, aligned):
    tensors = heads(3)
    for name in ("student_bias", "teacher_bias"):
        tensors[name] = torch.zeros_like(tensors[name])  # the forms' inputs differ in biases: none here
    align = alignment() if aligned else None
    rows = align.groups if aligned else tensors["student_hidden"].shape[0]
    if not aligned:
        tensors["teacher_hidden"] = tensors["teacher_hidden"][:rows]
    teacher_logits = logits_of(tensors, PLAIN)[1]
    labels = torch.randint(0, STUDENT_VOCAB, (rows,), generator=torch.Generator().manual_seed(2))
    module_class, args, function = forms(tensors, teacher_logits)[form]
    module = module_class(vocab_map=vocab_map, **SETTINGS)
    got = module(*args, labels, alignment=align, num_items_in_batch=5)
    want = function(*args, labels, vocab_map=vocab_map, alignment=align, num_items_in_batch=5, **SETTINGS)
    torch.testing.assert_close(got, want)
    assert "method='hybrid'" in repr(module) and "divergence='jsd'" in repr(module)


@pytest.mark.parametrize("module_class", [kdfast.CrossVocabDistillLoss, kdfast.LinearCrossVocabDistillLoss,
                                          kdfast.LinearStudentCrossVocabDistillLoss])
def test_a_bad_setting_fails_where_the_module_is_built(vocab_map, module_class):
    with pytest.raises(TypeError, match=r"unknown setting\(s\) \['temprature'\]"):
        module_class(vocab_map=vocab_map, temprature=2.0)
    with pytest.raises(ValueError, match="method='uld' compares sorted probabilities and takes no divergence"):
        module_class(vocab_map=vocab_map, method="uld", divergence="jsd")
    with pytest.raises(ValueError, match="vocab_map must be a kdfast.VocabMap"):
        module_class(vocab_map={"a": 1})
    with pytest.raises(ValueError, match="teacher_temperature must be a number > 0"):
        module_class(vocab_map=vocab_map, teacher_temperature=0.0)
    if module_class is not kdfast.CrossVocabDistillLoss:
        with pytest.raises(ValueError, match="chunk_size"):
            module_class(vocab_map=vocab_map, chunk_size=0)
        with pytest.raises(ValueError, match="softcap"):
            module_class(vocab_map=vocab_map, softcap=-1.0)
