"""The op contract: every registered op, on every backend, from the Examples it registers next to its
backends (fastgen._dispatch.Examples, in fastgen/ops/<op>.py), so that an op added later is covered by
registering it:

* an odd-sized batch matches the ref backend in float64 (float32 where the backend takes no float64),
  outputs and the gradients of every input that takes one;
* an empty batch runs forward and backward, with ref's output shapes and dtypes, and gradients of their
  inputs' shapes (a weight's gradient is a zero tensor of the weight's shape);
* float16 / bfloat16 inputs give ref's output dtypes (the reduction rule of fastgen.ref.precision), and
  gradients flow back to the half inputs;
* every registered bad call raises its ValueError / TypeError with its message, before any kernel runs.

An op that registers no Examples fails here, unless it declares itself an engine op (it takes a job, not
tensors: new_op(..., contract="engine")).
"""
import os

import pytest
import torch

import fastgen  # noqa: F401  (imports every op)
from fastgen._dispatch import OPS, BackendError

from conftest import require_backend

# the contract's tolerance against ref (float64 inputs cast to the backend's dtype); an op's Examples may widen it
TOL = {torch.float64: dict(rtol=1e-7, atol=1e-7), torch.float32: dict(rtol=1e-4, atol=1e-4)}
ODD_BATCH = 3


def _pairs():
    pairs = []  # an op without Examples fails test_every_op_joins_the_contract, once
    for name, op in OPS.items():
        for backend in op.backends if op.examples is not None else ():
            marks = [pytest.mark.triton] if backend == "triton" else [pytest.mark.gpu] if backend == "cuda" else []
            pairs.append(pytest.param(name, backend, marks=marks, id=f"{name}-{backend}"))
    return pairs


PAIRS = _pairs()


def _device(backend):
    return "cuda" if backend in ("cuda", "triton") and torch.cuda.is_available() else "cpu"


def _examples(name):
    examples = OPS[name].examples
    assert examples is not None, f"op {name} registers no Examples (see test_every_op_joins_the_contract)"
    return examples


def _leaves(args, kwargs):
    return [t for t in list(args) + list(kwargs.values()) if isinstance(t, torch.Tensor) and t.requires_grad]


def _run(name, backend, batch, dtype, device):
    """(inputs that take a gradient, outputs, their gradients) of one call of the op's example."""
    ex = _examples(name)
    args, kwargs = ex.inputs(batch, dtype, device, torch.Generator().manual_seed(0))
    out = ex.functional(*args, backend=backend, **kwargs)
    outs = list(out) if isinstance(out, (tuple, list)) else [out]
    leaves = _leaves(args, kwargs)
    gen = torch.Generator().manual_seed(1)
    loss = sum((o.double() * torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.device)).sum()
               for o in outs)
    grads = torch.autograd.grad(loss, leaves) if leaves else ()
    return leaves, [o.detach() for o in outs], list(grads)


def _unless_required(backend, why):
    """Skip a backend that cannot take the example here, with the reason; a failure where the run requires it."""
    if backend in os.environ.get("FASTGEN_REQUIRE", "").split(","):
        pytest.fail(f"backend {backend} is required in this run but cannot take the example: {why}")
    pytest.skip(f"backend {backend}: {why}")


def _work_dtype(name, backend, device):
    """float64 where the backend takes it, else float32."""
    require_backend(OPS[name], backend)
    why = None
    for dtype in (torch.float64, torch.float32):
        try:
            _run(name, backend, 1, dtype, device)
            return dtype
        except BackendError as e:
            why = str(e)
    _unless_required(backend, why)


@pytest.mark.parametrize("name", list(OPS))
def test_every_op_joins_the_contract(name):
    op = OPS[name]
    if op.contract == "engine":
        assert op.examples is None
        return
    assert op.examples is not None, (
        f"op {name} registers no Examples: register them next to its backends (OP.set_examples(Examples(...)), "
        f"see fastgen._dispatch), or declare an op that takes a job, not tensors, with new_op(..., contract='engine')")
    assert op.examples.bad, f"op {name} registers no bad calls"
    assert "ref" in op.backends, f"op {name} has no ref backend to be checked against"


@pytest.mark.parametrize("name, backend", PAIRS)
def test_odd_batch_matches_ref(name, backend):
    device = _device(backend)
    dtype = _work_dtype(name, backend, device)
    tol = {**TOL, **_examples(name).tol}[dtype]
    leaves, outs, grads = _run(name, backend, ODD_BATCH, dtype, device)
    ref_leaves, ref_outs, ref_grads = _run(name, "ref", ODD_BATCH, torch.float64, device)
    assert len(outs) == len(ref_outs) and len(grads) == len(ref_grads)
    for i, (o, r) in enumerate(zip(outs, ref_outs)):
        assert o.shape == r.shape, f"output {i}: shape {tuple(o.shape)}, ref's {tuple(r.shape)}"
        torch.testing.assert_close(o.double().cpu(), r.cpu(), **tol, msg=lambda m: f"output {i}: {m}")
    for i, (g, r) in enumerate(zip(grads, ref_grads)):
        torch.testing.assert_close(g.double().cpu(), r.cpu(), **tol, msg=lambda m: f"gradient {i}: {m}")


@pytest.mark.parametrize("name, backend", PAIRS)
def test_empty_batch(name, backend):
    device = _device(backend)
    dtype = _work_dtype(name, backend, device)
    leaves, outs, grads = _run(name, backend, 0, dtype, device)
    _, ref_outs, ref_grads = _run(name, "ref", 0, dtype, device)
    for i, (o, r) in enumerate(zip(outs, ref_outs)):
        assert (o.shape, o.dtype) == (r.shape, r.dtype), f"output {i}: {o.shape} {o.dtype}, ref's {r.shape} {r.dtype}"
    for i, (t, g, r) in enumerate(zip(leaves, grads, ref_grads)):
        assert (g.shape, g.dtype) == (t.shape, t.dtype), f"gradient {i}: {g.shape} {g.dtype} for input {t.shape}"
        assert torch.equal(g.cpu(), r.cpu()), f"gradient {i} differs from ref's (zeros for an empty batch)"


@pytest.mark.parametrize("name, backend", PAIRS)
def test_half_precision_output_dtypes(name, backend):
    device = _device(backend)
    require_backend(OPS[name], backend)
    taken = []
    for dtype in (torch.float16, torch.bfloat16):
        try:
            leaves, outs, grads = _run(name, backend, ODD_BATCH, dtype, device)
        except BackendError:
            continue  # a backend may refuse half inputs (dispatch then passes them on), never mistype them
        taken.append(dtype)
        _, ref_outs, _ = _run(name, "ref", ODD_BATCH, dtype, device)
        assert [o.dtype for o in outs] == [r.dtype for r in ref_outs]
        assert [g.dtype for g in grads] == [t.dtype for t in leaves]
        assert all(torch.isfinite(o).all() for o in outs)
    if not taken:
        pytest.skip(f"backend {backend} takes neither float16 nor bfloat16")


@pytest.mark.parametrize("name, backend", PAIRS)
def test_bad_calls_are_clear_errors(name, backend):
    ex = _examples(name)
    device = _device(backend)
    for bad in ex.bad:
        assert bad.error in (ValueError, TypeError), bad
        args, kwargs = bad.make(device)
        with pytest.raises(bad.error) as e:
            ex.functional(*args, backend=backend, **kwargs)
        assert bad.message in str(e.value), f"{name}: {str(e.value)!r} does not say {bad.message!r}"
