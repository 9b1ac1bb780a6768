"""Same inputs, same bits: every cpp kernel called again on the same inputs with 2 threads gives bit-identical
outputs and gradients (the masked convolution's weight gradient is a sum over chunks of rows that the threads
share: csrc/cpu/masked_conv.cpp's parallel_ordered fixes its order), and a training run repeated with one seed
ends with bit-identical weights on the default (cpp) backends."""
import pytest
import torch

from fastgen import functional as fn
from fastgen.ops import dmol, gated, masked_conv, reparameterize_kl

from conftest import require_backend

REPEATS = 4


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# name -> (op, tensors (made once), call(*leaves) -> a tensor or a tuple of tensors). Shapes: several chunks of
# rows and several threads' worth of work in every reduction (the masked convolution's weight gradient in both
# of its kernels, the gated activation's [B, 2C] conditioning gradient, the per-row KL sums).
CASES = {
    "masked_conv2d 7x7 A, 1 -> 16 (many chunks, 4 groups)": (
        masked_conv.OP, lambda: [_randn(40, 1, 28, 28, seed=1), _randn(16, 1, 7, 7, seed=2), _randn(16, seed=3)],
        lambda x, w, b: fn.masked_conv2d(x, w, b, "same", mask_type="A", backend="cpp")),
    "masked_conv2d 3x3 B, 64 -> 64": (
        masked_conv.OP, lambda: [_randn(16, 64, 28, 28, seed=1), _randn(64, 64, 3, 3, seed=2), _randn(64, seed=3)],
        lambda x, w, b: fn.masked_conv2d(x, w, b, "same", backend="cpp")),
    "masked_conv2d channels_last, 3 colours": (
        masked_conv.OP,
        lambda: [_randn(8, 24, 30, 30, seed=1).contiguous(memory_format=torch.channels_last),
                 _randn(48, 24, 5, 5, seed=2), _randn(48, seed=3)],
        lambda x, w, b: fn.masked_conv2d(x, w, b, "same", mask_type="B", data_channels=3, backend="cpp")),
    "vertical_conv2d 2x3 (Winograd)": (
        gated.VERTICAL, lambda: [_randn(16, 64, 28, 28, seed=1), _randn(128, 64, 2, 3, seed=2), _randn(128, seed=3)],
        lambda x, w, b: fn.vertical_conv2d(x, w, b, backend="cpp")),
    "gated_activation, [B, 2C] cond": (
        gated.ACT, lambda: [_randn(16, 128, 28, 28, seed=1), _randn(16, 128, seed=2)],
        lambda x, c: fn.gated_activation(x, c, backend="cpp")),
    "reparameterize_kl, sum": (
        reparameterize_kl.OP, lambda: [_randn(64, 5000, seed=1), _randn(64, 5000, seed=2)],
        lambda mu, lv: fn.reparameterize_kl(mu, lv, seed=7, backend="cpp")),
    "discretized_mix_logistic_nll": (
        dmol.OP, lambda: [torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1,
                          _randn(8, 50, 32, 32, seed=2)],
        lambda x, p: fn.discretized_mix_logistic_nll(x, p, backend="cpp")),
}


def _run(call, tensors, wants_grad):
    leaves = [t.detach().clone().requires_grad_(w) for t, w in zip(tensors, wants_grad)]
    outs = call(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    loss = sum((o * _randn(*o.shape, seed=9)).sum() for o in outs)
    grads = torch.autograd.grad(loss, [t for t in leaves if t.requires_grad])
    return [o.detach() for o in outs] + list(grads)


@pytest.mark.parametrize("name", list(CASES))
def test_cpp_kernels_repeat_bit_for_bit(name, two_threads):
    op, make, call = CASES[name]
    require_backend(op, "cpp")
    tensors = make()
    wants_grad = [not (op is dmol.OP and i == 0) for i in range(len(tensors))]  # dmol's x takes no gradient
    first = _run(call, tensors, wants_grad)
    for _ in range(REPEATS - 1):
        again = _run(call, tensors, wants_grad)
        for i, (a, b) in enumerate(zip(first, again)):
            assert torch.equal(a, b), f"{name}: result {i} differs between calls (max {(a - b).abs().max().item()})"


@pytest.mark.parametrize("model", ["pixelcnn", "gated-pixelcnn"])
def test_training_twice_with_one_seed_gives_the_same_weights(model, tmp_path, two_threads, digits):
    """The default backends (cpp on this CPU): two runs, same seed -> the same weights, bit for bit. Batch 64
    of 64 channels: the direct kernel's weight gradient spans several chunks of rows, and the gated model's
    vertical stack runs the Winograd kernel over several blocks."""
    require_backend(masked_conv.OP, "cpp")
    from fastgen.train import TrainConfig, train
    from fastgen.train.pixel import PixelOptions

    def run(name):
        cfg = TrainConfig(model=model, data="digits", steps=3, batch=64, channels=64, seed=3,
                          out=str(tmp_path / name), ckpt_every=0, samples=0, eval_batches=1, quiet=True,
                          device="cpu", options=PixelOptions(depth=2))
        return train(cfg)["weights_sha256"]

    assert run("a") == run("b")
