"""Driving the command lines in-process (click's CliRunner) and checking their user errors."""

from __future__ import annotations

from click.testing import CliRunner


def invoke(*args):
    """`llava-export ARGS...` in this process; paths may be Path objects."""
    from exporter.cli import main

    return CliRunner().invoke(main, [str(a) for a in args])


def assert_user_error(result, *fragments: str):
    """Exit 2, exactly one stderr line `error: ...` naming `fragments`, nothing else, no traceback."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0]
    assert "Traceback" not in result.output and result.stdout == ""


def assert_error_line(result, *fragments: str):
    """Exit 2 and exactly one `error: ...` line naming `fragments`, among other output (a
    command that prints its progress before it meets the error), no traceback."""
    assert result.exit_code == 2, result.output
    error = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(error) == 1, result.output
    for fragment in fragments:
        assert fragment in error[0], error[0]
    assert "Traceback" not in result.output
