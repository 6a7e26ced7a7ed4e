"""Build: the pure-Python package always; the compiled extension tropfast._C when possible.

The sources and flags come from csrc/build.json (shared with CMakeLists.txt).

    TROPFAST_BUILD_NATIVE=0     pure-Python package only
    TROPFAST_BUILD_NATIVE=1     the extension is required: a failed compile aborts the install
    (unset)                     build it when torch and a C++ compiler are present; a failed
                                compile only warns and tropfast runs on the closed form
    TROPFAST_BUILD_CUDA=0/1     force the CUDA kernels off / on (default: when torch.version.cuda
                                is set and nvcc is found)
    TROPFAST_CUDA_ARCHS=90      compute capabilities to build, comma-separated (default: build.json's)

torch must be importable at build time: ``pip install --no-build-isolation -e .``.
"""
from __future__ import annotations

import json
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _note(msg: str) -> None:
    print(f"tropfast setup: {msg}", file=sys.stderr)


def _flag(name: str) -> str | None:
    value = os.environ.get(name, "").strip().lower()
    if value in ("", "auto"):
        return None
    if value in ("0", "false", "no", "off"):
        return "0"
    if value in ("1", "true", "yes", "on"):
        return "1"
    raise SystemExit(f"{name}={os.environ[name]!r}: use 0 or 1")


def build_config() -> dict:
    with open(os.path.join(ROOT, "csrc", "build.json"), encoding="utf-8") as f:
        return json.load(f)


def _find_nvcc() -> str | None:
    from torch.utils import cpp_extension

    home = cpp_extension.CUDA_HOME
    if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
        return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")


def _has_cxx() -> bool:
    cxx = os.environ.get("CXX", "c++").split()[0]
    return shutil.which(cxx) is not None


def native_extensions() -> tuple[list, dict]:
    """(ext_modules, cmdclass) for setup(); empty when the extension cannot or must not be built."""
    native = _flag("TROPFAST_BUILD_NATIVE")
    want_cuda = _flag("TROPFAST_BUILD_CUDA")
    if native == "0":
        _note("TROPFAST_BUILD_NATIVE=0: installing the pure-Python package only")
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        if native == "1" or want_cuda == "1":
            raise SystemExit(
                "tropfast setup: the compiled extension was requested but torch is not importable at build "
                "time; install torch first and use `pip install --no-build-isolation .`"
            ) from None
        _note("torch is not importable at build time (build isolation?); installing the pure-Python package "
              "only. Use `pip install --no-build-isolation .` to build the native kernels.")
        return [], {}
    if not _has_cxx():
        if native == "1":
            raise SystemExit("tropfast setup: TROPFAST_BUILD_NATIVE=1 but no C++ compiler was found")
        _note("no C++ compiler found; installing the pure-Python package only")
        return [], {}

    cfg = build_config()
    nvcc = _find_nvcc()
    if want_cuda == "1":
        if torch.version.cuda is None:
            raise SystemExit(
                f"tropfast setup: TROPFAST_BUILD_CUDA=1 but torch {torch.__version__} is a CPU-only build "
                "(torch.version.cuda is None); install a CUDA build of torch or unset TROPFAST_BUILD_CUDA"
            )
        if nvcc is None:
            raise SystemExit("tropfast setup: TROPFAST_BUILD_CUDA=1 but nvcc was not found (set CUDA_HOME)")
    build_cuda = want_cuda == "1" or (want_cuda is None and torch.version.cuda is not None and nvcc is not None)

    sources = list(cfg["cpu_sources"])
    cxx = list(cfg["cxx_flags"]) + list(cfg["openmp_flags"])
    extra_link = list(cfg["openmp_flags"])
    kwargs: dict = {}
    if build_cuda:
        sources += cfg["cuda_sources"]
        cxx.append(f"-D{cfg['cuda_define']}")
        archs = [a.strip() for a in os.environ.get("TROPFAST_CUDA_ARCHS", "").split(",") if a.strip()] or cfg["cuda_archs"]
        if not all(a.isdigit() for a in archs):
            raise SystemExit(f"TROPFAST_CUDA_ARCHS={os.environ['TROPFAST_CUDA_ARCHS']!r}: use numbers such as 80,90")
        gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
        last = archs[-1]
        gencode.append(f"-gencode=arch=compute_{last},code=compute_{last}")
        nvcc_flags = list(cfg["nvcc_flags"]) + [f"-D{cfg['cuda_define']}"] + gencode
        kwargs["extra_compile_args"] = {"cxx": cxx, "nvcc": nvcc_flags}
        ext_cls = cpp_extension.CUDAExtension
        _note(f"building tropfast._C with CPU and CUDA kernels (torch {torch.__version__}, CUDA {torch.version.cuda})")
    else:
        kwargs["extra_compile_args"] = {"cxx": cxx}
        ext_cls = cpp_extension.CppExtension
        why = "TROPFAST_BUILD_CUDA=0" if want_cuda == "0" else (
            "torch has no CUDA" if torch.version.cuda is None else "nvcc not found")
        _note(f"building tropfast._C with CPU kernels only ({why})")
    ext = ext_cls(
        name=cfg["extension"],
        sources=sources,
        include_dirs=[os.path.join(ROOT, d) for d in cfg["include_dirs"]],
        depends=list(cfg["headers"]) + ["csrc/build.json"],
        extra_link_args=extra_link,
        optional=native != "1",
        **kwargs,
    )
    return [ext], {"build_ext": _build_ext_class(cpp_extension.BuildExtension)}


def _build_ext_class(base):
    class BuildExt(base):
        """torch's BuildExtension, except that an optional extension that fails only warns."""

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as exc:  # the ninja path raises RuntimeError, not CompileError
                if not getattr(ext, "optional", False):
                    raise
                _note(f"building {ext.name} failed ({exc}); tropfast will run on the pure-PyTorch closed form. "
                      "Set TROPFAST_BUILD_NATIVE=1 to make this an error.")

    return BuildExt.with_options(no_python_abi_suffix=False)


if __name__ == "__main__":
    ext_modules, cmdclass = native_extensions()
    setup(ext_modules=ext_modules, cmdclass=cmdclass)
