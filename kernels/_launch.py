"""Starting a Triton kernel: the one way every launcher in fastgen.kernels starts one.

A launcher checks its arguments, allocates its outputs and describes each kernel start as a ``Launch`` (the
kernel, its positional arguments, the constexprs it fixes, the grid), which it hands to its ``launch=`` argument:
``start`` by default. The compile report (fastgen.kernels.compile_report) passes a recorder instead and compiles,
ahead of time and for each GPU architecture, exactly what the launcher would start: a kernel's signature comes
from the launcher's own arguments, never from a second copy that could drift.

Launchers take tensors of any device, so the report can plan on meta tensors (no memory, any size); ``start``
is where a kernel's tensors must be CUDA tensors (CPU tensors under TRITON_INTERPRET=1).
"""
import os
from typing import Any, Callable, NamedTuple, Union

import torch
import triton
from triton.compiler.errors import CompilationError
from triton.runtime.errors import OutOfResources, PTXASError

from fastgen._dispatch import KernelCompileError
from fastgen._ext import cuda_arch

try:  # the error of an autotuner whose every config failed (triton >= 3.3)
    from triton.runtime.errors import AutotunerError
except ImportError:  # pragma: no cover - older triton
    AutotunerError = CompilationError

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# What triton raises when a kernel cannot be compiled or loaded for the device: front end and lowering
# (CompilationError), ptxas, too much shared memory or too many registers at load (OutOfResources), an autotuner
# none of whose configs compiled. An MLIR pass failure is a RuntimeError: it is recognised by its message.
COMPILE_ERRORS = (CompilationError, OutOfResources, PTXASError, AutotunerError)
_PASS_FAILURE = "PassManager::run failed"


class Launch(NamedTuple):
    """One kernel start, as a launcher plans it."""
    kernel: Any  # a @triton.jit function, or a triton.autotune Autotuner around one (its configs: the candidates)
    grid: Union[tuple, Callable]  # the grid, or grid(meta) of the constexprs (those of the config included)
    args: tuple  # the kernel's positional arguments
    consts: dict  # the constexprs the launcher fixes
    interp: dict = {}  # under TRITON_INTERPRET=1 (which cannot autotune): the tiles that replace the configs


def jit_function(kernel):
    """The @triton.jit function of a launch's kernel (an autotuner's own, for an autotuned one)."""
    return getattr(kernel, "fn", kernel) if isinstance(kernel, triton.runtime.Autotuner) else kernel


def kernel_name(kernel):
    """'<module>.<function>' of a kernel, the module short (masked_conv._fwd_kernel)."""
    fn = jit_function(kernel)
    return f"{fn.__module__.rsplit('.', 1)[-1]}.{fn.__name__}"


def compile_error(launch, error):
    """The KernelCompileError (fastgen._dispatch: the dispatch's rule for it) of ``launch`` failing with
    ``error``."""
    device = next(a.device for a in launch.args if isinstance(a, torch.Tensor))
    arch = cuda_arch(device) if device.type == "cuda" else device.type
    first = str(error).strip().splitlines()
    name = kernel_name(launch.kernel)
    return KernelCompileError(f"Triton kernel {name} failed to compile for {arch}: "
                              f"{type(error).__name__}: {first[0] if first else ''}", name, arch)


def _device_error(launch):
    """Why the launch's tensors cannot be run here, or None."""
    devices = {a.device for a in launch.args if isinstance(a, torch.Tensor)}
    if len(devices) > 1:
        return f"its tensors are on several devices: {', '.join(sorted(map(str, devices)))}"
    device = next(iter(devices), None)
    if device is None or device.type == "cuda" or (INTERPRET and device.type == "cpu"):
        return None
    return (f"it needs CUDA tensors (CPU tensors only under TRITON_INTERPRET=1 set before importing fastgen), got "
            f"{device.type}")


def start(launch):
    """Run ``launch``: its autotuner's choice (or its fixed constexprs) on a GPU, the interpreter's fixed tiles
    under TRITON_INTERPRET=1. A compile (or load) failure is a KernelCompileError naming the kernel."""
    why = _device_error(launch)
    if why:
        raise ValueError(f"{kernel_name(launch.kernel)}: {why}")
    if INTERPRET:
        meta = dict(launch.consts, **launch.interp)
        grid = launch.grid(meta) if callable(launch.grid) else launch.grid
        launch.kernel[grid](*launch.args, **meta)
        return
    try:
        launch.kernel[launch.grid](*launch.args, **launch.consts)
    except COMPILE_ERRORS as e:
        raise compile_error(launch, e) from e
    except RuntimeError as e:
        if _PASS_FAILURE not in str(e):
            raise
        raise compile_error(launch, e) from e
