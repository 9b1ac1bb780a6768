"""Builds fastgen and its C++ extension fastgen._C.

* csrc/cpu/*.cpp is always built (-O3 -g0 -fopenmp; OpenMP linked too, or
  at::parallel_for runs on one thread);
* csrc/cuda/*.cu and *.cpp are added when torch has CUDA;
* FASTGEN_SKIP_EXT=1 gives a pure-Python install;
* FASTGEN_PTXAS_VERBOSE=1 has ptxas report each CUDA kernel's registers,
  spills and shared memory (`make cuda-build` keeps that log).
The folder kernels/ is installed as fastgen.kernels (never as a top-level
`kernels`, a name taken on the package index). fastgen/py.typed marks the
package as typed (PEP 561).
"""
import glob
import os

from setuptools import setup

packages = ["fastgen", "fastgen.data", "fastgen.models", "fastgen.nn", "fastgen.ops", "fastgen.ref", "fastgen.sampling",
            "fastgen.train", "fastgen.kernels"]
package_dir = {"fastgen": "fastgen", "fastgen.kernels": "kernels"}


def extensions():
    if os.environ.get("FASTGEN_SKIP_EXT") == "1":
        return [], {}
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension, CUDA_HOME

    sources = ["csrc/module.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    cxx = ["-O3", "-g0", "-fopenmp", "-std=c++20"]
    with_cuda = torch.version.cuda is not None and CUDA_HOME is not None and os.environ.get("FASTGEN_NO_CUDA") != "1"
    if with_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))
        ext = CUDAExtension("fastgen._C", sources, include_dirs=[os.path.abspath("csrc")],
                            define_macros=[("FASTGEN_WITH_CUDA", "1")],
                            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-lineinfo"] + (
                                ["-Xptxas=-v"] if os.environ.get("FASTGEN_PTXAS_VERBOSE") == "1" else [])},
                            extra_link_args=["-fopenmp"])
    else:
        ext = CppExtension("fastgen._C", sources, include_dirs=[os.path.abspath("csrc")],
                           extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extensions()
# compiled.json: which ops' Triton kernels compiled for which architectures (the dispatch reads it)
setup(packages=packages, package_dir=package_dir,
      package_data={"fastgen": ["py.typed"], "fastgen.kernels": ["compiled.json"]}, ext_modules=ext_modules,
      cmdclass=cmdclass)
