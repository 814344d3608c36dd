"""`kdfast <command> --help` shows that command's own options; a bad option is an error that names it; only the
command named is imported, and a missing extra is one line naming it."""

import ast
import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

from kdfast.cli import main, missing_extra_line, parse


def setup_extras() -> dict[str, list[str]]:
    """setup.py's extras_require, read from its source (literal lists)."""
    tree = ast.parse((Path(__file__).resolve().parent.parent / "setup.py").read_text())
    call = next(node for node in ast.walk(tree)
                if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "setup")
    return ast.literal_eval(next(keyword.value for keyword in call.keywords if keyword.arg == "extras_require"))


SETUP_EXTRAS = setup_extras()


@pytest.mark.parametrize("argv,expected", [
    (["distill", "--help"], "--teacher-steps"),
    (["bench", "--help"], "vocab-parallel"),
    (["bench", "linear", "--help"], "--chunk-size"),
    (["bench", "vocab-parallel", "--help"], "--ranks"),
    (["profile", "--help"], "--teacher-hidden"),
    (["build", "--help"], "kdfast build"),
    (["bench", "trl", "--help"], "--betas"),
    (["teacher-cache", "--help"], "--windows-per-shard"),
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


def test_help_imports_no_command(tmp_path):
    """`kdfast --help` lists every command from their sources: none of them, nor an extra, is imported."""
    code = ("import sys\nfrom kdfast.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(name for name in sys.modules if name.split('.')[0] in ('rich', 'matplotlib', "
            "'transformers', 'trl', 'bench_distill', 'profile_memory') or name.startswith(('kdfast.demo', "
            "'kdfast.teacher_cache'))))")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_full_starts_from_the_benchmarks_full_settings_under_the_options_given():
    short = parse(["bench", "trl"])
    for argv in (["bench", "--full", "trl", "--repeats", "2"], ["bench", "trl", "--full", "--repeats", "2"]):
        full = parse(argv)
        expected = {**vars(short), **full.module.FULL_SETTINGS, "repeats": 2}
        assert {key: getattr(full, key) for key in ("tokens", "repeats", "memory")} == \
            {key: expected[key] for key in ("tokens", "repeats", "memory")}


def test_a_missing_extra_is_one_line_naming_it(capsys, monkeypatch):
    monkeypatch.delitem(sys.modules, "bench_distill", raising=False)
    monkeypatch.setitem(sys.modules, "rich.console", None)  # an install without the bench extra
    assert main(["bench", "logits", "--help"]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kdfast bench logits needs the 'bench' extra")
    assert lines[0].endswith("pip install 'kdfast[bench]'")


@pytest.mark.parametrize("named,missing,extra", [
    (["bench", "trl"], "trl", "integrations"),
    (["teacher-cache"], "safetensors", "integrations"),
    (["profile"], "matplotlib.pyplot", "bench"),
    (["bench", "linear"], "not_an_extra_package", None),
    (["build"], "rich", None),
])
def test_the_extra_named_is_the_commands(named, missing, extra, monkeypatch):
    # The extras as an install records them (setup.py's), so that a bare checkout on the path, which has no such
    # record (the GPU machine's runs), meets the same cases.
    recorded = [f'{package}; extra == "{name}"' for name, packages in SETUP_EXTRAS.items() for package in packages]
    monkeypatch.setattr(importlib.metadata, "requires", lambda name: recorded if name == "kdfast" else None)
    line = missing_extra_line(named, ModuleNotFoundError(f"No module named '{missing}'", name=missing))
    assert (line is None) if extra is None else f"pip install 'kdfast[{extra}]'" in line


def test_a_bare_checkout_names_the_commands_extra_for_any_missing_module(monkeypatch):
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "requires", not_installed)
    line = missing_extra_line(["bench", "linear"], ModuleNotFoundError("No module named 'x'", name="x"))
    assert line is not None and "pip install 'kdfast[bench]'" in line
