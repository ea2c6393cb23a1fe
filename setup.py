"""Build and install fastlm.

Python packages: `fastlm` (the public API) and `fastlm.kernels` (the Triton kernels, kept at the top level in
`kernels/`). The CUDA C++ extension `fastlm._C` is built from `csrc/` by nvcc through ninja, into a shared
library that never links libtorch: tensors cross as raw pointers, so one build works with any torch version and
compiles on a machine that has nvcc and no GPU.

Environment:
  FASTLM_BUILD_CUDA=0   skip the CUDA extension (fastlm then runs with the triton and torch backends only).
  FASTLM_CUDA_ARCHS     space-separated list of gencode targets, default "80 90a".
  NVCC                  the nvcc to use, default: $CUDA_HOME/bin/nvcc, else nvcc on PATH.
"""

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"
DEFAULT_ARCHS = "80 90a"


def find_nvcc():
    if os.environ.get("NVCC"):
        return os.environ["NVCC"]
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and Path(home, "bin", "nvcc").exists():
            return str(Path(home, "bin", "nvcc"))
    return shutil.which("nvcc")


def ninja_file(nvcc, build_dir, out_path, archs):
    """Write build.ninja: every csrc/*.cu and csrc/*.cpp compiled by nvcc, linked into one shared library."""
    import pybind11

    py_inc = sysconfig.get_paths()["include"]
    gencode = " ".join(f"-gencode arch=compute_{a},code=sm_{a}" for a in archs)
    # Warnings are errors, in nvcc's front end, in the host compiler and in ptxas.
    warn = "-Werror all-warnings -Xcompiler -Wall,-Wextra,-Werror -Xptxas -Werror"
    cflags = (
        f"-O3 -std=c++17 --threads 0 -Xcompiler -fPIC -Xcompiler -fvisibility=hidden --expt-relaxed-constexpr {warn} "
        f"-I{CSRC} -isystem {pybind11.get_include()} -isystem {py_inc}"
    )
    sources = sorted(CSRC.glob("*.cu")) + sorted(CSRC.glob("*.cpp"))
    headers = " ".join(str(h) for h in sorted(CSRC.glob("*.cuh")) + sorted(CSRC.glob("*.h")))
    lines = [
        "ninja_required_version = 1.3",
        f"nvcc = {nvcc}",
        f"cflags = {cflags}",
        f"gencode = {gencode}",
        "rule cu",
        "  command = $nvcc $cflags $gencode -MD -MF $out.d -c $in -o $out",
        "  depfile = $out.d",
        "  deps = gcc",
        "  description = nvcc $in",
        "rule cxx",
        "  command = $nvcc $cflags -x c++ -MD -MF $out.d -c $in -o $out",
        "  depfile = $out.d",
        "  deps = gcc",
        "  description = c++ $in",
        "rule link",
        "  command = $nvcc -shared $gencode -cudart static $in -o $out",
        "  description = link $out",
    ]
    objs = []
    for src in sources:
        obj = Path(build_dir, src.name + ".o")
        objs.append(str(obj))
        rule = "cu" if src.suffix == ".cu" else "cxx"
        lines.append(f"build {obj}: {rule} {src} | {headers}")
    lines.append(f"build {out_path}: link {' '.join(objs)}")
    lines.append(f"default {out_path}")
    return "\n".join(lines) + "\n"


def skip_reason():
    if os.environ.get("FASTLM_BUILD_CUDA", "1") == "0":
        return "FASTLM_BUILD_CUDA=0"
    if find_nvcc() is None:
        return "nvcc not found (the cuda backend will be unavailable)"
    return None


class NinjaCudaBuild(build_ext):
    def run(self):
        reason = skip_reason()
        if reason:
            print(f"fastlm: skipping the CUDA extension fastlm._C: {reason}")
            self.extensions = []
            return
        super().run()

    def build_extension(self, ext):
        nvcc = find_nvcc()
        archs = os.environ.get("FASTLM_CUDA_ARCHS", DEFAULT_ARCHS).split()
        build_dir = ROOT / "build" / "cuda"
        build_dir.mkdir(parents=True, exist_ok=True)
        lib = build_dir / "_C.so"
        text = ninja_file(nvcc, build_dir, lib, archs)
        ninja_path = build_dir / "build.ninja"
        if not ninja_path.exists() or ninja_path.read_text() != text:
            ninja_path.write_text(text)
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 1))
        subprocess.run([sys.executable, "-m", "ninja", "-C", str(build_dir), "-j", jobs], check=True)
        out = Path(self.get_ext_fullpath(ext.name))
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(lib, out)


setup(
    name="fastlm",
    version="0.1.0",
    description="Fused Triton and CUDA C++ kernels for training transformer language models in PyTorch",
    packages=["fastlm", "fastlm.ops", "fastlm.kernels", "fastlm.models", "fastlm.integrations"],
    package_dir={"fastlm.kernels": "kernels"},
    ext_modules=[Extension("fastlm._C", sources=[])],
    cmdclass={"build_ext": NinjaCudaBuild},
    python_requires=">=3.10",
    install_requires=["torch", "triton", "numpy"],
)
