"""Optional dependencies (runtime/extras.py): a command or option whose pip extra is missing
prints one line naming the extra, exits 2, and shows no traceback.

"Missing" is simulated in a child process whose import system refuses the extra's modules,
as a machine with only the runtime installed (`pip install llava-export`) would."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from runtime.errors import LlavaError
from runtime.extras import EXTRAS, MissingExtra, installed, require

ROOT = Path(__file__).resolve().parents[1]

BLOCKER = """
import sys
BLOCKED = set(sys.argv[1].split(","))
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError("no " + name)
sys.meta_path.insert(0, Block())
"""


def run_without(blocked: tuple[str, ...], code: str, *args: str) -> subprocess.CompletedProcess:
    script = BLOCKER + code
    command = [sys.executable, "-c", script, ",".join(blocked), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=ROOT)


def assert_one_line_naming(done: subprocess.CompletedProcess, *fragments: str) -> None:
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert "Traceback" not in done.stderr, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


EXPORT_MODULES = EXTRAS["export"][1]


@pytest.mark.parametrize(
    "args",
    [
        ["vision", "--model", "m", "--out", "o"],
        ["decoder", "--model", "m", "--out", "o"],
        ["all", "--model", "m", "--out", "o"],
        ["verify", "--model", "m", "--artifacts", "a"],
    ],
)
def test_llava_export_without_the_export_extra(args, tmp_path):
    code = "from exporter.cli import main\nmain(sys.argv[2:])\n"
    done = run_without(EXPORT_MODULES, code, *args)
    assert_one_line_naming(
        done, f"llava-export {args[0]} needs the exporter", "llava-export[export]", "torch==2.13.0"
    )
    assert not (ROOT / "o").exists()


def test_llava_export_help_needs_no_extra():
    done = run_without(EXPORT_MODULES, "from exporter.cli import main\nmain(['--help'])\n")
    assert done.returncode == 0, done.stderr
    assert "vision" in done.stdout and "engine" in done.stdout


def test_llava_bench_without_the_export_extra():
    code = "from exporter.bench.cli import main\nmain(sys.argv[2:])\n"
    done = run_without(EXPORT_MODULES, code, "--model", "m", "--artifacts", "a")
    assert_one_line_naming(done, "llava-bench needs the exporter", "llava-export[export]")


def test_require_names_what_is_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert not installed("matplotlib")
    assert not installed("no_such_module_anywhere")
    assert installed("numpy")
    with pytest.raises(
        MissingExtra,
        match=r"--plot needs matplotlib, not installed here \(matplotlib missing\): pip install 'llava-export\[bench\]'",
    ):
        require("bench", "--plot")
    assert issubclass(MissingExtra, LlavaError)  # printed as one line, exit 2, by every command
