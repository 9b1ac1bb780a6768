"""Finding the compiled extension and Triton, and saying why one is missing.

These are facts of the installation: fastgen._dispatch asks each once, when a
backend is registered, and keeps the answer (so nothing here is called, or
cached behind functools.lru_cache, while torch.compile traces a dispatch)."""
import importlib.util
import json
import os


def cpp_unavailable():
    """None if the C++ extension fastgen._C is loaded, else why not."""
    try:
        from fastgen import _C  # noqa: F401  (registers the fastgen:: C++ ops)
    except ImportError as e:
        return ("the C++ extension fastgen._C is not built (" + str(e).splitlines()[0] + "); "
                "build it with `pip install -e . --no-build-isolation` without FASTGEN_SKIP_EXT=1, or `make test`")
    return None


def cpp_op_unavailable(kernel, op):
    """None if fastgen._C is loaded and registers ``torch.ops.fastgen.<kernel>``, else why not (an old build
    lacks the ops added since)."""
    why = cpp_unavailable()
    if why is None:
        import torch
        if not hasattr(torch.ops.fastgen, kernel):
            why = f"fastgen._C was built without {op} (an old build): rebuild it with `make build`"
    return why


def cuda_ext_unavailable():
    """None if the CUDA part of the extension was built, else why not."""
    why = cpp_unavailable()
    if why:
        return why
    from fastgen import _C
    if not _C.built_with_cuda():
        return "fastgen._C was built without CUDA (torch had no CUDA when it was built)"
    return None


def interpreting():
    return os.environ.get("TRITON_INTERPRET") == "1"


def triton_unavailable():
    """None if triton is installed (found, not imported: importing it costs a fraction of a second, and only
    a Triton kernel needs it), else why not."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton)"
    return None


def triton_why_not(device_type):
    """Triton runs CUDA tensors, and CPU tensors only under TRITON_INTERPRET=1."""
    if device_type == "cuda":
        return None
    if device_type == "cpu" and interpreting():
        return None
    if device_type == "cpu":
        return "triton takes CPU tensors only under TRITON_INTERPRET=1 (set before importing fastgen)"
    return f"triton does not run on {device_type} tensors"


_ARCHS = {}


def cuda_arch(device):
    """'sm_90' for a CUDA device of compute capability 9.0 (asked once per device)."""
    import torch
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _ARCHS:
        major, minor = torch.cuda.get_device_capability(index)
        _ARCHS[index] = f"sm_{major}{minor}"
    return _ARCHS[index]


_COMPILED = None


def compiled_archs(backend, op):
    """The architectures for which fastgen's compile report compiled every kernel of ``op``'s ``backend``
    (kernels/compiled.json, written and checked by `make compile-report`)."""
    global _COMPILED
    if _COMPILED is None:  # package data of fastgen.kernels (kernels/ in the source tree)
        from importlib import resources
        _COMPILED = json.loads(resources.files("fastgen.kernels").joinpath("compiled.json").read_text())
    return _COMPILED.get(backend, {}).get(op, [])
