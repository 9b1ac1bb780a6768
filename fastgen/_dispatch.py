"""The dispatch rule, written once for every op.

Order of choice for one call:
1. an explicit ``backend=`` argument, else the ``FASTGEN_BACKEND`` environment
   variable: used if it can take the call, otherwise an error that lists why.
   The variable is global: an op that has no backend of that name (the gated
   convolution has no ``cpp`` backend of its own) ignores it, but a name that
   no op has is an error (a typo must not pass silently);
2. otherwise the op's measured preference list for the tensor's device type:
   the first backend in it that can take the call. ``ref`` always can. On a
   CUDA device a Triton backend is preferred only for an architecture where
   fastgen's compile report compiled every kernel of the op
   (kernels/compiled.json, checked by `make compile-report`).

A kernel that fails to compile (or load) at its first launch raises
``KernelCompileError`` naming it: a ``BackendError`` when the backend was asked
for, otherwise a one-time warning naming the failure and the backend that runs
instead, the next in the preference list (that backend and architecture are
then skipped). A backward kernel that fails so computes its gradients with
``ref`` (``backward``) after the same warning.

Every op also joins the op contract (tests/test_op_contract.py): next to its
backends it registers ``Examples`` (valid inputs of any batch size, and bad
calls with the error each must raise), or declares itself an engine op
(``contract="engine"``: it takes a job, not tensors, and its own tests cover it).
"""
import contextvars
import os
import warnings
from typing import Any, Callable, Dict, NamedTuple, Optional, Sequence

import torch

from fastgen import _ext


class BackendError(RuntimeError):
    """An explicitly requested backend cannot take the call."""


class KernelCompileError(BackendError):
    """A kernel failed to compile, or to load, for a device at its launch. ``kernel`` names it, ``arch`` is the
    device's architecture (sm_90; the device type for a device that is not CUDA)."""

    def __init__(self, message, kernel, arch):
        super().__init__(message)
        self.kernel, self.arch = kernel, arch


# True while an op runs a backend that was asked for (backend= or FASTGEN_BACKEND): a kernel op's autograd
# context keeps it for its backward (``explicit()``)
_EXPLICIT = contextvars.ContextVar("fastgen_explicit_backend", default=False)


def explicit():
    """Whether the backend running now was asked for explicitly (False while torch.compile traces: its graph
    launches the kernels later, outside the dispatch)."""
    return not torch.compiler.is_compiling() and _EXPLICIT.get()


class BadCall(NamedTuple):
    """A call the op must refuse before any kernel runs: ``make(device)`` -> (args, kwargs) of the functional,
    the error it raises (ValueError or TypeError) and a substring of its message."""
    make: Callable
    error: type
    message: str


class Examples(NamedTuple):
    """How the op contract (tests/test_op_contract.py) calls an op, on each of its backends.

    ``functional``: the public function (it takes ``backend=``).
    ``inputs(batch, dtype, device, generator)`` -> (args, kwargs): a valid call of ``batch`` images or rows
    (0 included) with odd sizes; floating tensors in ``dtype``, those that take a gradient with requires_grad.
    ``bad``: BadCalls.
    ``tol``: {dtype: dict(rtol=, atol=)} where the op's spec allows more than the contract's default
    against ref (e.g. noise drawn in float32 whatever the input's dtype)."""
    functional: Callable
    inputs: Callable
    bad: Sequence[BadCall]
    tol: Dict[Any, Dict[str, float]] = {}


CONTRACTS = ("tensor", "engine")


class Op:
    """The backends of one op and the order in which they are preferred."""

    def __init__(self, name, preference, contract="tensor"):
        if contract not in CONTRACTS:
            raise ValueError(f"op {name}: contract must be one of {CONTRACTS}, got {contract!r}")
        self.name = name
        # device type -> backend names, fastest first (each op records its measurements)
        self.preference = preference
        self.contract = contract
        self.examples = None
        self.backends = {}
        self.failed = {}  # (backend, arch) -> why: kernels that failed to compile at their first launch there

    def register(self, name, run, *, why_not=None, unavailable=None):
        """``run(call)`` computes the op. ``unavailable()`` says why the backend is
        missing altogether (no build, no triton), ``why_not(call)`` why it cannot
        take one call (device, dtype, shape); each returns None when fine.
        ``unavailable`` is a fact of the installation: it is asked once, here, and
        the answer kept (a dispatch traced by torch.compile only reads it)."""
        self.backends[name] = (run, why_not or (lambda call: None), unavailable() if unavailable else None)

    def set_examples(self, examples):
        """Join the op contract (see the module docstring)."""
        if self.contract != "tensor":
            raise ValueError(f"op {self.name}: an {self.contract} op takes no Examples")
        self.examples = examples

    def reason(self, name, call=None):
        """Why ``name`` cannot run (this call), or None if it can."""
        if name not in self.backends:
            return f"{self.name} has no backend {name!r} (it has: {', '.join(self.backends)})"
        _, why_not, missing = self.backends[name]
        return missing or (why_not(call) if call is not None else None)

    def choose(self, call, device, backend=None):
        """Name of the backend that runs ``call`` on ``device`` (a torch.device or its name; see the module
        docstring)."""
        device = torch.device(device)
        requested, source = backend, "backend="
        if requested is None:
            env = forced_backend()
            if env in self.backends:
                requested, source = env, "FASTGEN_BACKEND="
        if requested is not None:
            why = self.reason(requested, call)
            if why:
                raise BackendError(f"{self.name}: {source}{requested!r} cannot take this call: {why}")
            return requested
        for name in self.preference.get(device.type, ()):
            if name in self.backends and self.reason(name, call) is None and self.skipped(name, device) is None:
                return name
        return "ref"

    def skipped(self, name, device):
        """Why the preference list passes over backend ``name`` on ``device`` although it can take the call (it
        failed to compile there, or a Triton backend's kernels were not compiled for the architecture), or None."""
        arch = _ext.cuda_arch(device) if device.type == "cuda" else device.type
        if (name, arch) in self.failed:
            return self.failed[(name, arch)]
        if device.type == "cuda" and name == "triton":
            compiled = _ext.compiled_archs(name, self.name)
            if arch not in compiled:
                return (f"its kernels were not compiled for {arch} in fastgen's compile report (compiled for: "
                        f"{', '.join(compiled) or 'none'})")
        return None

    def run(self, call, device, backend=None):
        name = self.choose(call, device, backend)
        if torch.compiler.is_compiling():  # traced: the compiled graph launches the kernels, not this call
            return self.backends[name][0](call)
        asked = backend is not None or forced_backend() in self.backends
        token = _EXPLICIT.set(asked)
        try:
            return self.backends[name][0](call)
        except KernelCompileError as e:
            if asked:
                raise
            self.failed[(name, e.arch)] = f"it failed to compile there: {e}"
            self._warn(name, e, self.choose(call, device))
        finally:
            _EXPLICIT.reset(token)
        return self.run(call, device)

    def _warn(self, name, error, instead):
        warnings.warn(f"{self.name}: {error}; {instead!r} runs instead, and the {name} backend is skipped on "
                      f"{error.arch} from now on (pass backend={name!r} to get this as an error)", RuntimeWarning,
                      stacklevel=4)

    def backward(self, name, asked, kernel_grads, ref_grads):
        """The gradients of a kernel backend's backward ``kernel_grads()``; if its kernel fails to compile, the
        error when ``asked`` (the backend was requested), otherwise the one-time warning and ``ref_grads()``."""
        try:
            return kernel_grads()
        except KernelCompileError as e:
            if asked:
                raise
            if (name, e.arch) not in self.failed:
                self.failed[(name, e.arch)] = f"it failed to compile there: {e}"
                self._warn(name, e, "ref")
            return ref_grads()

    def status(self):
        """{backend: None if available, else the reason it is missing}."""
        return {name: self.reason(name) for name in self.backends}


def takes(backend, device_type, dtypes, tensor=lambda c: c.x):
    """why_not for a kernel backend that runs one device type and some dtypes; ``tensor(call)`` is the
    call's tensor that decides (device and dtype)."""
    def why_not(c):
        t = tensor(c)
        if t.device.type != device_type:
            return f"the {backend} backend takes {device_type} tensors, got {t.device.type}"
        if t.dtype not in dtypes:
            names = " and ".join(", ".join(str(d).replace("torch.", "") for d in dtypes).rsplit(", ", 1))
            return f"the {backend} backend takes {names}, got {t.dtype}"
        return None
    return why_not


def vjp(fn, inputs, need, grad_outputs):
    """The gradients, by autograd through ``fn(*inputs)`` (a tensor or a tuple of them), of the inputs flagged in
    ``need`` (None for the others and for an input the outputs do not depend on): how a kernel backend's backward
    falls back to ``ref``."""
    leaves = [t.detach().requires_grad_(bool(n)) if isinstance(t, torch.Tensor) else t for t, n in zip(inputs, need)]
    with torch.enable_grad():
        outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    pairs = [(o, g) for o, g in zip(outs, grad_outputs) if g is not None and o.requires_grad]
    wanted = [t for t, n in zip(leaves, need) if n]
    got = iter(torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs], allow_unused=True)
               if pairs and wanted else [None] * len(wanted))
    return [next(got) if n else None for n in need]


def example_randn(shape, dtype, device, generator, *, grad=True, scale=1.0):
    """An Examples input: a float64 normal draw from ``generator`` (a CPU generator: the same numbers on every
    device) times ``scale``, as ``dtype`` on ``device``, taking a gradient when ``grad``."""
    t = (torch.randn(shape, generator=generator, dtype=torch.float64) * scale).to(device=device, dtype=dtype)
    return t.requires_grad_(grad)


OPS = {}


def new_op(name, preference, *, contract="tensor"):
    """A new op (its backends are registered on it). ``contract``: 'tensor' (the default: the op registers
    Examples with ``set_examples``) or 'engine' (it takes a job, not tensors)."""
    op = Op(name, preference, contract)
    OPS[name] = op
    return op


def known_backends():
    """Sorted names of every backend of every op."""
    return sorted({name for op in OPS.values() for name in op.backends})


def forced_backend() -> Optional[str]:
    """The backend FASTGEN_BACKEND forces (None when unset or empty); a name no op has is a BackendError that
    lists the known ones."""
    env = os.environ.get("FASTGEN_BACKEND") or None
    if env is not None and env not in known_backends():
        raise BackendError(f"FASTGEN_BACKEND={env!r} is no backend of any op; fastgen's backends: "
                           f"{', '.join(known_backends())}")
    return env


def autocast(device_type, *tensors):
    """Under torch.autocast for ``device_type``, floating tensors cast to the
    autocast dtype (as F.conv2d's inputs are), so that fastgen's ops, whose
    tensors must share one dtype, take mixed float32 weights and bf16
    activations; otherwise the tensors as they are. None stays None."""
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in tensors)
