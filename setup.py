"""Build fastddpm: the Python package, kernels/ as fastddpm.kernels, and the
optional C++/CUDA extension fastddpm._C.

Install with `pip install -e . --no-build-isolation` (build isolation would hide
the installed torch from the C++ build). Set FASTDDPM_NO_EXT=1 to skip the
extension, FASTDDPM_DEBUG=1 for an -O0 -g build. A failed extension build is
reported and skipped: the package still installs and runs on the reference.
The torch version the extension was built against is written beside it
(fastddpm/_C.torch_version); fastddpm/_ext.py refuses to load _C under another.
"""
import glob
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _ext_modules():
    if os.environ.get("FASTDDPM_NO_EXT") == "1":
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:  # no torch at build time: pure-Python install
        return [], {}
    debug = os.environ.get("FASTDDPM_DEBUG") == "1"
    # no-trapping-math: lets GCC vectorise the clamps and compares in the kernels (no FP traps used)
    cxx = ["-O0", "-g"] if debug else ["-O3", "-fno-trapping-math"]
    # at::parallel_for is inlined into the extension: without -fopenmp its OpenMP
    # pragma is dropped and every C++ kernel runs on one thread. The libgomp it
    # links is torch's own (same soname, already loaded by torch's OpenMP build).
    omp = sys.platform.startswith("linux") and "OpenMP" in torch.__config__.parallel_info()
    cxx += ["-fopenmp"] if omp else []
    link = ["-fopenmp"] if omp else []
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))
    use_cuda = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None and cuda_sources
    if use_cuda:
        ext = cpp_extension.CUDAExtension(
            "fastddpm._C", sources + cuda_sources,
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-lineinfo"] if not debug else ["-O0", "-g", "-G"]},
            extra_link_args=link,
        )
    else:
        ext = cpp_extension.CppExtension("fastddpm._C", sources, extra_compile_args={"cxx": cxx},
                                         extra_link_args=link)
    return [ext], {"build_ext": _build_ext_class(cpp_extension.BuildExtension.with_options(use_ninja=True))}


def _build_ext_class(base):
    class BuildExt(base):
        """Record the torch version; a failed build warns instead of failing the install."""

        def run(self):
            import torch
            try:
                super().run()
            except Exception as e:  # noqa: BLE001  (compiler missing, bad headers, ...)
                print(f"warning: fastddpm._C was not built ({type(e).__name__}: {e}); "
                      "the C++ backend is unavailable")
                return
            for ext in self.extensions:
                path = self.get_ext_fullpath(ext.name)
                with open(os.path.splitext(path)[0].split(".cpython")[0] + ".torch_version", "w") as f:
                    f.write(torch.__version__)
    return BuildExt


ext_modules, cmdclass = _ext_modules()

setup(
    name="fastddpm",
    version="0.1.0",
    description="A paper-exact DDPM engine with fused Triton/C++ kernels",
    python_requires=">=3.10",
    packages=["fastddpm", "fastddpm.ops", "fastddpm.sampling", "fastddpm.kernels"],
    package_dir={"fastddpm.kernels": "kernels"},
    package_data={"fastddpm": ["assets/*.npz", "_C.torch_version"]},
    install_requires=["torch>=2.11", "numpy", "tqdm", "pillow", "safetensors", "matplotlib>=3.8"],
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
