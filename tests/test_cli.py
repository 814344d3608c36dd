"""`kdfast <command> --help` shows that command's own options; a bad option is an error that names it."""

import pytest

from kdfast.cli import main


@pytest.mark.parametrize("argv,expected", [
    (["distill", "--help"], "--teacher-steps"),
    (["bench", "--help"], "vocab-parallel"),
    (["bench", "linear", "--help"], "--chunk-size"),
    (["bench", "vocab-parallel", "--help"], "--ranks"),
    (["profile", "--help"], "--teacher-hidden"),
    (["build", "--help"], "kdfast build"),
])
def test_each_command_lists_its_own_options(capsys, argv, expected):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 0
    assert expected in capsys.readouterr().out


@pytest.mark.parametrize("argv,named", [
    (["distill", "--teacher-stepz", "3"], "--teacher-stepz"),
    (["bench", "logits", "--tokens", "many"], "--tokens"),
    (["bench", "vocab-parallel", "--vocab", "7"], "--vocab must divide evenly"),
    (["distill", "--steps", "0"], "--steps must be >= 1"),
    (["train"], "invalid choice: 'train'"),
])
def test_bad_options_are_named(capsys, argv, named):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert named in capsys.readouterr().err
