"""scripts/int4_gemv_probe.c: the kernel behind docs/benchmarks.md's "What caps int4 at one row"
computes the product it is timed on (its own check against a scalar reference), and rejects bad
arguments. Built and run where gcc and AVX-512 VNNI are present."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

PROBE = Path(__file__).resolve().parents[1] / "scripts" / "int4_gemv_probe.c"


def has_avx512_vnni() -> bool:
    cpuinfo = Path("/proc/cpuinfo")
    return cpuinfo.exists() and "avx512_vnni" in cpuinfo.read_text()


pytestmark = pytest.mark.skipif(
    shutil.which("gcc") is None or not has_avx512_vnni(),
    reason="the probe needs gcc and an AVX-512 VNNI CPU",
)


@pytest.fixture(scope="module")
def probe(tmp_path_factory) -> Path:
    binary = tmp_path_factory.mktemp("probe") / "int4_gemv_probe"
    command = ["gcc", "-O3", "-march=native", "-fopenmp", str(PROBE), "-o", str(binary), "-lm"]
    subprocess.run(command, check=True, capture_output=True)
    return binary


def test_kernel_matches_the_scalar_reference(probe):
    result = subprocess.run([str(probe), "2", "1"], capture_output=True, text=True, check=True)
    error = float(re.search(r"reference: ([0-9.e+-]+)", result.stdout).group(1))
    assert error < 1e-4, result.stdout
    assert "GB/s stored" in result.stdout


def test_bad_arguments_exit_2(probe):
    result = subprocess.run([str(probe), "0"], capture_output=True, text=True)
    assert result.returncode == 2
    assert "usage" in result.stderr
