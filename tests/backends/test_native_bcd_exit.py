"""The early exit of the native dense BCD loop (csrc/cpu/solve_simd.h with csrc/cycle.h's detector).

The loop stops a unit once its state cycles; the result must be that of every sweep, bit for
bit.  The op always runs with the exit, so the check compiles the header into a small program
(tests/backends/cpp/dense_bcd_exit.cpp) that runs each unit both ways.
"""
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOURCE = Path(__file__).parent / "cpp" / "dense_bcd_exit.cpp"


def _compiler():
    return shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")


@pytest.mark.skipif(_compiler() is None, reason="no C++ compiler on PATH")
def test_dense_bcd_early_exit_is_bit_exact(tmp_path):
    exe = tmp_path / "dense_bcd_exit"
    build = [_compiler(), "-O3", "-std=c++20", "-fopenmp-simd", f"-I{ROOT / 'csrc'}", str(SOURCE), "-o", str(exe)]
    proc = subprocess.run(build, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(build)}\n{proc.stdout}\n{proc.stderr}"
    out = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120, check=True).stdout.split()
    counts = dict(zip(out[::2], map(int, out[1::2])))
    # fp32 and fp64, 4 shapes, 48 λ, with and without the generator penalty, 9 values of T
    assert counts["cases"] == 2 * 4 * 48 * 2 * 9
    assert counts["mismatches"] == 0
    # the exit must have been taken, and at T = 301..303 consecutive T must land on different
    # iterates of a cycle, or the phase after the jump went untested
    assert counts["exits"] > counts["cases"] // 2
    assert counts["phased"] > 100
