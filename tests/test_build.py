"""The build description: csrc/build.json lists every source, CMake configures, the CUDA
sources compile for sm_80 and sm_90 (compile-only: no GPU is needed)."""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
BUILD = json.loads((CSRC / "build.json").read_text())
SOURCE_SUFFIXES = (".cpp", ".cc", ".cu")
HEADER_SUFFIXES = (".h", ".hpp", ".cuh")


def _files(suffixes):
    return sorted(p.relative_to(ROOT).as_posix() for p in CSRC.rglob("*") if p.suffix in suffixes)


def test_build_file_lists_every_source():
    listed = set(BUILD["cpu_sources"]) | set(BUILD["cuda_sources"])
    present = set(_files(SOURCE_SUFFIXES))
    assert present - listed == set(), f"sources in csrc/ missing from csrc/build.json: {sorted(present - listed)}"
    assert listed - present == set(), f"csrc/build.json lists sources that do not exist: {sorted(listed - present)}"
    headers = set(_files(HEADER_SUFFIXES))
    assert headers == set(BUILD["headers"]), (
        f"headers in csrc/ {sorted(headers)} != build.json headers {sorted(BUILD['headers'])}"
    )
    cuda_only = [s for s in BUILD["cpu_sources"] if s.endswith(".cu") or "/cuda/" in s or "cuda" in Path(s).name]
    assert not cuda_only, f"CUDA sources listed as CPU sources: {cuda_only}"


def test_setup_and_cmake_read_the_build_file():
    setup_py = (ROOT / "setup.py").read_text()
    cmake = (ROOT / "CMakeLists.txt").read_text()
    assert "build.json" in setup_py and "build.json" in cmake
    for key in ("cpu_sources", "cuda_sources", "cxx_flags", "openmp_flags", "nvcc_flags", "cuda_archs"):
        assert key in setup_py and key in cmake, f"{key} is not read by both setup.py and CMakeLists.txt"


def _nvcc():
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and (Path(home) / "bin" / "nvcc").exists():
        return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


@pytest.mark.parametrize("source", [s for s in BUILD["cuda_sources"] if s.endswith(".cu")])
def test_cuda_sources_compile(source):
    nvcc = _nvcc()
    if nvcc is None:
        print("nvcc not found: CUDA compile check skipped")
        pytest.skip("nvcc not found (set CUDA_HOME or put nvcc on PATH)")
    gencode = []
    for arch in ("80", "90"):
        gencode.append(f"-gencode=arch=compute_{arch},code=sm_{arch}")
    includes = [f"-I{ROOT / d}" for d in BUILD["include_dirs"]]
    try:  # the flags torch's CUDAExtension adds (no implicit half / bfloat16 conversions)
        from torch.utils.cpp_extension import COMMON_NVCC_FLAGS as torch_flags
    except ImportError:
        torch_flags = []
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / (Path(source).stem + ".o")
        cmd = [nvcc, "-c", str(ROOT / source), "-o", str(out), f"-std=c++{BUILD['cxx_standard']}",
               f"-D{BUILD['cuda_define']}", *BUILD["nvcc_flags"], *torch_flags, *gencode, *includes]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"nvcc failed on {source}:\n{' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}"
        assert out.stat().st_size > 0


def test_cmake_configures():
    cmake = shutil.which("cmake")
    if cmake is None:
        pytest.skip("cmake not found")
    torch = pytest.importorskip("torch")
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [cmake, "-S", str(ROOT), "-B", tmp, f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
               f"-DPython_EXECUTABLE={sys.executable}"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"cmake configure failed:\n{proc.stdout}\n{proc.stderr}"
        assert (Path(tmp) / "CMakeCache.txt").exists()


@pytest.mark.slow
def test_cuda_registration_compiles():
    """cuda_ops.cpp is only built with a CUDA torch; check its syntax against the headers here.

    CPU wheels of torch ship c10/cuda without the generated cuda_cmake_macros.h, so a stub
    stands in for it.
    """
    torch = pytest.importorskip("torch")
    from torch.utils import cpp_extension

    nvcc = _nvcc()
    cxx = shutil.which(os.environ.get("CXX", "c++"))
    if nvcc is None or cxx is None:
        pytest.skip("needs nvcc (for the CUDA runtime headers) and a C++ compiler")
    homes = [cpp_extension.CUDA_HOME, Path(nvcc).resolve().parents[1], "/usr/local/cuda"]
    found = [Path(h) / "include" for h in homes if h and (Path(h) / "include" / "cuda_runtime.h").exists()]
    if not found:
        pytest.skip("the CUDA runtime headers (cuda_runtime.h) were not found; set CUDA_HOME")
    cuda_include = found[0]
    with tempfile.TemporaryDirectory() as tmp:
        stub = Path(tmp) / "c10" / "cuda" / "impl"
        stub.mkdir(parents=True)
        if not (Path(torch.__file__).parent / "include" / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").exists():
            (stub / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
        includes = [f"-I{p}" for p in cpp_extension.include_paths()] + [f"-I{tmp}", f"-I{cuda_include}"]
        includes += [f"-I{ROOT / d}" for d in BUILD["include_dirs"]]
        for source in (s for s in BUILD["cuda_sources"] if not s.endswith(".cu")):
            cmd = [cxx, "-fsyntax-only", f"-std=c++{BUILD['cxx_standard']}", f"-D{BUILD['cuda_define']}",
                   *includes, str(ROOT / source)]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            assert proc.returncode == 0, f"{source} does not compile:\n{proc.stderr[-4000:]}"


def test_wheel_without_a_compiler_is_pure_python(tmp_path):
    """`pip install .` on a machine with no C++ compiler: a working pure-Python package."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md", "MANIFEST.in", "CMakeLists.txt"):
        shutil.copy(ROOT / name, src / name)
    for folder in ("csrc", "tropfast", "requirements"):
        shutil.copytree(ROOT / folder, src / folder, ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("TROPFAST_BUILD")}
    env["CXX"] = "tropfast-no-such-compiler"
    out = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q", "-w", str(tmp_path / "dist"), str(src)],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    wheels = list((tmp_path / "dist").glob("tropfast-*.whl"))
    assert len(wheels) == 1
    names = zipfile.ZipFile(wheels[0]).namelist()
    assert "tropfast/ops.py" in names and "tropfast/backends/torch/closed_form.py" in names
    assert not [n for n in names if n.startswith("tropfast/_C")], "a compiled module was built without a compiler"
    assert "py3-none-any" in wheels[0].name
