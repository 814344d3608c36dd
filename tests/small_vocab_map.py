"""The small pair of vocabularies the cross-vocabulary tests share: a teacher of 13 strings tok0..tok12, a student of
11 holding seven of them in another order and four of its own (so both sides have unmatched tokens)."""

import kdfast

STUDENT_VOCAB, TEACHER_VOCAB = 11, 13


class Vocabulary:
    """A tokenizer as VocabMap.from_tokenizers reads one: its string -> id map."""

    def __init__(self, vocab: dict):
        self.vocab = vocab

    def get_vocab(self):
        return dict(self.vocab)


def small_vocab_map() -> kdfast.VocabMap:
    teacher = {f"tok{i}": i for i in range(TEACHER_VOCAB)}
    student = {**{f"tok{t}": s for s, t in enumerate([5, 0, 12, 3, 9, 7, 1])},
               **{f"own{s}": s for s in range(7, STUDENT_VOCAB)}}
    return kdfast.VocabMap.from_tokenizers(Vocabulary(student), Vocabulary(teacher))
