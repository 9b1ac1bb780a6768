"""The torch executor of a cached-sampling Program (fastgen/sampling/program.py):
per-slot caches as tensors, each instruction as framework ops over the batch.
Runs on any device and dtype; the C++ engine (csrc/cpu/sampling.cpp) runs the
same program faster on the CPU."""
import torch
import torch.nn.functional as F

from fastgen._progress import Progress
from fastgen.sampling.common import draw
from fastgen.sampling.program import ACT, ADD, AFFINE, CONST, CONV, COPY, GATE, MUL

_ACT_FNS = {
    "identity": lambda a, p: a,
    "relu": lambda a, p: F.relu(a),
    "leaky_relu": lambda a, p: F.leaky_relu(a, p),
    "elu": lambda a, p: F.elu(a, p),
    "tanh": lambda a, p: torch.tanh(a),
    "sigmoid": lambda a, p: torch.sigmoid(a),
    "silu": lambda a, p: F.silu(a),
    "gelu": lambda a, p: F.gelu(a),
    "softplus": lambda a, p: F.softplus(a),
}


class TorchEngine:
    """Slots as [B, rows, W + 2 pad, C] rings; runs instructions on the columns
    [x0, x1) of one row."""

    def __init__(self, prog):
        self.prog = prog
        _, _, w = prog.shape
        self.pad = prog.pad
        self.bufs = [torch.zeros(prog.batch, s.rows, w + 2 * prog.pad, s.channels, dtype=prog.dtype,
                                 device=prog.device) for s in prog.slots]

    def at(self, slot, y, x0, x1, dy=0, dx=0):
        """The slot's values at row y+dy, columns [x0+dx, x1+dx): [B, n, C], None above row 0."""
        r = y + dy
        if r < 0:
            return None
        buf = self.bufs[slot]
        return buf[:, r % buf.shape[1], x0 + dx + self.pad:x1 + dx + self.pad]

    def run(self, instrs, y, x0, x1, block=None):
        """Each instruction at row y, columns [x0, x1): all its output channels,
        or only colour block ``block`` of them (Program.blocks)."""
        nb = self.prog.blocks
        for i in instrs:
            out = self.at(i.out, y, x0, x1)
            a = self.at(i.a, y, x0, x1)
            lo, hi = 0, out.shape[-1]
            if block is not None:
                lo, hi = block * hi // nb, (block + 1) * hi // nb
            o = out[..., lo:hi]
            if i.op == CONV:
                acc = torch.zeros_like(o) if i.bias is None else i.bias[lo:hi].expand(o.shape).clone()
                for t, (dy, dx) in enumerate(i.taps):
                    src = self.at(i.a, y, x0, x1, dy, dx)
                    if src is not None:
                        acc += src @ i.weight[t][:, lo:hi]
                o.copy_(acc)
            elif i.op == ACT:
                o.copy_(_ACT_FNS[i.act](a[..., lo:hi], i.param))
            elif i.op == AFFINE:
                o.copy_(a[..., lo:hi] * i.scale[lo:hi] + i.shift[lo:hi])
            elif i.op == ADD:
                b = self.at(i.b, y, x0, x1)[..., lo:hi]
                o.copy_(a[..., lo:hi] + b if i.param == 1.0 else a[..., lo:hi] + i.param * b)
            elif i.op == MUL:
                o.copy_(a[..., lo:hi] * self.at(i.b, y, x0, x1)[..., lo:hi])
            elif i.op == CONST:
                c = i.const[:, None, lo:hi] if i.const.dim() == 2 else i.const[:, y, x0:x1, lo:hi]
                o.copy_(a[..., lo:hi] * c if i.multiply else a[..., lo:hi] + c)
            elif i.op == GATE:  # out channels [lo, hi) are whole gate blocks of the input's [2 lo, 2 hi)
                g = a[..., 2 * lo:2 * hi]
                dc = i.data_channels if block is None else 1
                blocks = g.reshape(*g.shape[:2], dc, 2, (hi - lo) // dc)
                o.copy_((torch.tanh(blocks[:, :, :, 0]) * torch.sigmoid(blocks[:, :, :, 1])).reshape(o.shape))
            elif i.op == COPY:
                out[..., i.out_off:i.out_off + i.count].copy_(a[..., i.in_off:i.in_off + i.count])
            else:
                raise RuntimeError(f"unknown opcode {i.op}")


@torch.no_grad()
def run_torch(prog, u, feed_table, *, likelihood, levels, temperature=1.0, images=None, progress=False):
    """Generate with the torch executor. ``u`` [H, W, C, B]: the uniforms;
    ``images`` (teacher forcing): feed these values instead of drawing, and
    also return the logits each position's step computed, [B, C_out, H, W].
    Returns (images int64 [B, C, H, W], logits or None)."""
    c, h, w = prog.shape
    eng = TorchEngine(prog)
    b = prog.batch
    out_images = torch.zeros(b, c, h, w, dtype=torch.long, device=prog.device)
    logits_out = None
    if images is not None:
        logits_out = torch.zeros(b, prog.slots[prog.output].channels, h, w, dtype=prog.dtype, device=prog.device)
        images = images.to(prog.device).long()
    inp = eng.bufs[prog.input]
    rows_in, pad = inp.shape[1], prog.pad
    bar = Progress(h * w * c, "sampling (cached, torch)", enabled=progress)
    try:
        for y in range(h):
            for x in range(w):
                inp[:, y % rows_in, x + pad].zero_()  # the ring row still holds row y - rows
                for ch in range(c):
                    block = ch if prog.blocks > 1 else None
                    eng.run(prog.pixel, y, x, x + 1, block)
                    logits = eng.at(prog.output, y, x, x + 1)[:, 0]
                    sl = slice(ch, ch + 1) if likelihood == "bernoulli" else slice(ch * levels, (ch + 1) * levels)
                    if images is not None:
                        v = images[:, ch, y, x]
                        logits_out[:, sl, y, x] = logits[:, sl]
                    else:
                        mine = logits[:, ch] if likelihood == "bernoulli" else logits[:, sl]
                        v = draw(mine, likelihood, temperature, u[y, x, ch])
                    out_images[:, ch, y, x] = v
                    inp[:, y % rows_in, x + pad, ch] = feed_table[v]
                    bar.update()
                    if block is not None:  # colour block by block: block ch of what depends on the pixel
                        eng.run(prog.post, y, x, x + 1, block)
                if prog.blocks == 1:
                    eng.run(prog.post, y, x, x + 1)
            if y + 1 < h:
                eng.run(prog.row, y, 0, w)
    finally:
        bar.close()
    return out_images, logits_out
