"""One formatter and one linter for the whole tree (ruff.toml): the code is as `ruff format` writes it, and
`ruff check` finds nothing. CI runs them here, in the README's test command."""

import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUFF = shutil.which("ruff") or "ruff"  # requirements-dev.txt installs it


@pytest.mark.parametrize("command", [["format", "--check"], ["check"]], ids=["format", "lint"])
def test_ruff_finds_nothing(command):
    result = subprocess.run([RUFF, *command, "."], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]


def test_the_check_sees_a_badly_formatted_file(tmp_path):
    """The same config, on a file written by hand the way the formatter does not write it, fails: the test can fail."""
    shutil.copy(os.path.join(ROOT, "ruff.toml"), tmp_path)
    (tmp_path / "bad.py").write_text("import os\nx = {  'a':1 }\n")
    for command in (["format", "--check"], ["check"]):
        assert subprocess.run([RUFF, *command, "."], cwd=tmp_path, capture_output=True).returncode != 0, command
