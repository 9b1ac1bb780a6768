"""The dispatch rule, written once for every op.

Order of choice for one call:
1. an explicit ``backend=`` argument, else the ``FASTGEN_BACKEND`` environment
   variable: used if it can take the call, otherwise an error that lists why.
   The variable is global: an op that has no backend of that name (the gated
   convolution has no ``cpp`` backend of its own) ignores it, but a name that
   no op has is an error (a typo must not pass silently);
2. otherwise the op's measured preference list for the tensor's device type:
   the first backend in it that can take the call. ``ref`` always can.
"""
import os

import torch


class BackendError(RuntimeError):
    """An explicitly requested backend cannot take the call."""


class Op:
    """The backends of one op and the order in which they are preferred."""

    def __init__(self, name, preference):
        self.name = name
        # device type -> backend names, fastest first (each op records its measurements)
        self.preference = preference
        self.backends = {}

    def register(self, name, run, *, why_not=None, unavailable=None):
        """``run(call)`` computes the op. ``unavailable()`` says why the backend is
        missing altogether (no build, no triton), ``why_not(call)`` why it cannot
        take one call (device, dtype, shape); each returns None when fine."""
        self.backends[name] = (run, why_not or (lambda call: None), unavailable or (lambda: None))

    def reason(self, name, call=None):
        """Why ``name`` cannot run (this call), or None if it can."""
        if name not in self.backends:
            return f"{self.name} has no backend {name!r} (it has: {', '.join(self.backends)})"
        _, why_not, unavailable = self.backends[name]
        return unavailable() or (why_not(call) if call is not None else None)

    def choose(self, call, device_type, backend=None):
        """Name of the backend that runs ``call`` (see the module docstring)."""
        requested, source = backend, "backend="
        env = os.environ.get("FASTGEN_BACKEND")
        if requested is None and env:
            known = {name for op in OPS.values() for name in op.backends}
            if env in self.backends or env not in known:
                requested, source = env, "FASTGEN_BACKEND="
        if requested is not None:
            why = self.reason(requested, call)
            if why:
                raise BackendError(f"{self.name}: {source}{requested!r} cannot take this call: {why}")
            return requested
        for name in self.preference.get(device_type, ()):
            if name in self.backends and self.reason(name, call) is None:
                return name
        return "ref"

    def run(self, call, device_type, backend=None):
        name = self.choose(call, device_type, backend)
        return self.backends[name][0](call)

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


OPS = {}


def new_op(name, preference):
    op = Op(name, preference)
    OPS[name] = op
    return op


def autocast(device_type, *tensors):
    """Under torch.autocast for ``device_type``, floating tensors cast to the
    autocast dtype (as F.conv2d's inputs are), so that fastgen's ops, whose
    tensors must share one dtype, take mixed float32 weights and bf16
    activations; otherwise the tensors as they are. None stays None."""
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in tensors)
