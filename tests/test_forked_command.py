"""tests/forked_command.py: a script run in a fork of the worker's fork server behaves as `python script.py` would."""

import os
import sys

from forked_command import forks_can_run, run_command


def _script(tmp_path, text):
    path = tmp_path / "script.py"
    path.write_text(text)
    return path


def test_a_script_gets_its_argv_folder_environment_and_streams(tmp_path):
    script = _script(tmp_path, "import os, sys\n"
                               "here = sys.argv, os.getcwd(), os.environ.get('ONLY_HERE'), sys.path[0], __name__\n"
                               "print(*here, sep='\\n')\n"
                               "print('to stderr', file=sys.stderr)\n"
                               "sys.exit(3)\n")
    env = {**os.environ, "ONLY_HERE": "yes"}
    result = run_command([str(script), "--flag", "1"], env=env, cwd=tmp_path, timeout=120)
    assert result.returncode == 3
    assert result.stdout.splitlines() == [str([str(script), "--flag", "1"]), str(tmp_path), "yes", str(tmp_path),
                                          "__main__"]
    assert result.stderr.strip() == "to stderr"
    assert "ONLY_HERE" not in os.environ


def test_an_exception_ends_it_with_code_1_and_its_traceback(tmp_path):
    script = _script(tmp_path, "raise RuntimeError('the script failed')\n")
    result = run_command([str(script)], env=dict(os.environ), cwd=tmp_path, timeout=120)
    assert result.returncode == 1
    assert "RuntimeError: the script failed" in result.stderr and "Traceback" in result.stderr


def test_a_module_runs_as_with_dash_m(tmp_path):
    (tmp_path / "a_module_here.py").write_text("import sys\nprint(__name__, sys.argv[1:])\n")
    result = run_command(["-m", "a_module_here", "x"], env=dict(os.environ), cwd=tmp_path, timeout=120)
    assert (result.returncode, result.stdout.strip()) == (0, "__main__ ['x']"), result.stderr


def test_it_runs_in_another_process_that_has_imported_torch(tmp_path):
    script = _script(tmp_path, "import os, sys\nprint(os.getpid(), 'torch' in sys.modules)\n")
    result = run_command([str(script)], env=dict(os.environ), cwd=tmp_path, timeout=120)
    pid, imported = result.stdout.split()
    assert int(pid) != os.getpid()
    assert imported == str(forks_can_run(dict(os.environ)) and sys.platform != "win32")
