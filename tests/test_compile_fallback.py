"""A kernel that fails to compile at its first launch (fastgen._dispatch): a BackendError naming it when its
backend was asked for; otherwise one warning naming the failure and the backend that runs instead, the same
results as that backend (ref's gradients for a backward that fails), and the backend skipped from then on.
And the compile report's record: a Triton backend is preferred on CUDA only for an architecture where all of
the op's kernels compiled (kernels/compiled.json).

A compile failure is simulated by making the op's launcher raise what kernels/_launch.py raises."""
import importlib
import warnings

import pytest
import torch

import fastgen  # noqa: F401  (imports every op)
from fastgen import _ext
from fastgen._dispatch import OPS, BackendError, KernelCompileError

# op -> (its kernel module in fastgen.kernels, forward launcher, backward launcher)
LAUNCHERS = {
    "masked_conv2d": ("masked_conv", "masked_conv2d_forward", "masked_conv2d_backward"),
    "gated_activation": ("gated", "gated_activation_forward", "gated_activation_backward"),
    "gated_conv2d": ("gated", "gated_conv2d_forward", "gated_conv2d_backward"),
    "discretized_mix_logistic_nll": ("dmol", "dmol_nll_forward", "dmol_nll_backward"),
    "reparameterize_kl": ("reparameterize_kl", "reparameterize_kl_forward", "reparameterize_kl_backward"),
    "batch_norm_act": ("batch_norm_act", "batch_norm_act_forward", "batch_norm_act_backward"),
}
TRITON_OPS = sorted(name for name, op in OPS.items() if "triton" in op.backends)


def test_every_triton_op_is_covered_here_and_in_the_record():
    assert sorted(LAUNCHERS) == TRITON_OPS
    for name in TRITON_OPS:
        assert {"sm_80", "sm_90"} <= set(_ext.compiled_archs("triton", name)), name


def test_triton_is_preferred_on_cuda_only_where_the_report_compiled_it(monkeypatch):
    op = OPS["discretized_mix_logistic_nll"]
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(_ext, "cuda_arch", lambda device: "sm_90")
    assert op.skipped("triton", cuda) is None
    monkeypatch.setattr(_ext, "cuda_arch", lambda device: "sm_75")
    assert "not compiled for sm_75" in op.skipped("triton", cuda)
    assert "sm_80, sm_90" in op.skipped("triton", cuda)


DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # triton's: CPU under the interpreter


def _failing(kernel):
    """A launcher that raises what kernels/_launch.py raises for a kernel that does not compile."""
    def launcher(*args, **kwargs):
        arch = _ext.cuda_arch(DEVICE) if DEVICE.type == "cuda" else DEVICE.type
        raise KernelCompileError(f"Triton kernel {kernel} failed to compile for {arch}: CompilationError: "
                                 f"simulated", kernel, arch)
    return launcher


def _call(name, backend=None):
    """(outputs, gradients of the example's inputs) of the op's contract example in float32."""
    ex = OPS[name].examples
    args, kwargs = ex.inputs(3, torch.float32, DEVICE, torch.Generator().manual_seed(0))
    out = ex.functional(*args, backend=backend, **kwargs)
    outs = list(out) if isinstance(out, (tuple, list)) else [out]
    leaves = [t for t in list(args) + list(kwargs.values()) if isinstance(t, torch.Tensor) and t.requires_grad]
    gen = torch.Generator().manual_seed(1)
    loss = sum((o.double() * torch.randn(o.shape, generator=gen, dtype=torch.float64).to(DEVICE)).sum()
               for o in outs)
    return [o.detach() for o in outs], list(torch.autograd.grad(loss, leaves))


def _close(a, b):
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-4)


@pytest.fixture
def triton_first(monkeypatch, request):
    """The op's preference list for DEVICE led by triton, its failures forgotten after."""
    name = request.param
    op = OPS[name]
    monkeypatch.setitem(op.preference, DEVICE.type, ["triton", "ref"])
    monkeypatch.setattr(op, "failed", {})
    return name


@pytest.mark.triton
@pytest.mark.parametrize("triton_first", TRITON_OPS, indirect=True)
@pytest.mark.parametrize("stage", ["forward", "backward"])
def test_a_kernel_that_fails_to_compile_warns_once_and_the_next_backend_runs(triton_first, stage, monkeypatch):
    name = triton_first
    module, fwd, bwd = LAUNCHERS[name]
    kernels = importlib.import_module(f"fastgen.kernels.{module}")
    monkeypatch.setattr(kernels, fwd if stage == "forward" else bwd, _failing(f"{module}._{stage}_kernel"))
    want = _call(name, backend="ref")
    with pytest.warns(RuntimeWarning, match=rf"{module}\._{stage}_kernel failed to compile.*'ref' runs instead"):
        got = _call(name)
    _close(want[0], got[0])
    _close(want[1], got[1])
    assert "failed to compile" in OPS[name].skipped("triton", DEVICE)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once: later calls go to ref without a word
        _close(want[1], _call(name)[1])


@pytest.mark.triton
@pytest.mark.parametrize("name", TRITON_OPS)
@pytest.mark.parametrize("stage", ["forward", "backward"])
def test_a_kernel_that_fails_to_compile_is_an_error_when_its_backend_was_asked_for(name, stage, monkeypatch):
    module, fwd, bwd = LAUNCHERS[name]
    kernels = importlib.import_module(f"fastgen.kernels.{module}")
    monkeypatch.setattr(kernels, fwd if stage == "forward" else bwd, _failing(f"{module}._{stage}_kernel"))
    with pytest.raises(BackendError, match=rf"{module}\._{stage}_kernel failed to compile"):
        _call(name, backend="triton")
    monkeypatch.setenv("FASTGEN_BACKEND", "triton")
    with pytest.raises(BackendError, match="failed to compile"):
        _call(name)
