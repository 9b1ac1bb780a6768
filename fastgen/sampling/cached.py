"""The torch executor of cached sampling: runs a Schedule
(fastgen/sampling/schedule.py) with per-slot rings as tensors, each instruction
as framework ops over the batch; any device and dtype. The C++ engine
(csrc/cpu/schedule.cpp) runs the same schedules faster on the CPU."""
import torch
import torch.nn.functional as F

from fastgen._progress import Progress
from fastgen.sampling.common import draw, draw_mixture
from fastgen.sampling.code import ACT, ADD, AFFINE, CONST, CONV, CONVT, COPY, FILL, GATE, MUL

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


class ScheduleEngine:
    """The torch executor of a Schedule (fastgen/sampling/schedule.py): slots
    as rings [B, ring, C] (position (y, x) at (y W + x) % ring, as the C++
    engine keeps them), each instruction at a list of positions."""

    def __init__(self, prog):
        self.prog = prog
        self.bufs = [torch.zeros(prog.batch, s.ring, s.channels, dtype=prog.dtype, device=prog.device)
                     for s in prog.slots]

    def read(self, ref, ys, xs, channels, valid=None):
        """Operand ``ref`` at positions (ys, xs) of its view: [B, n, channels], zeros outside."""
        buf = self.bufs[ref.slot]
        sy, sx = ys - ref.oy, xs - ref.ox
        ok = (sy >= ref.y0) & (sy < ref.y1) & (sx >= ref.x0) & (sx < ref.x1)
        if valid is not None:
            ok &= valid
        at = (sy * self.prog.slots[ref.slot].w + sx).clamp(min=0) % buf.shape[1]
        v = buf[:, at, ref.c0:ref.c0 + channels]
        return torch.where(ok[None, :, None], v, torch.zeros((), dtype=v.dtype, device=v.device))

    def run(self, i, pos):
        """Instruction ``i`` at positions ``pos`` of its output: output channels [i.lo, i.hi) of those it writes."""
        s = self.prog.slots[i.out]
        ys, xs = pos // s.w, pos % s.w
        out = self.bufs[i.out]
        at = pos % out.shape[1]  # the ring positions written
        lo, hi = i.lo, i.hi
        if i.op in (CONV, CONVT):
            acc = torch.zeros(out.shape[0], len(pos), hi - lo, dtype=out.dtype, device=out.device)
            if i.bias is not None:
                acc += i.bias[lo:hi]
            sy, sx = i.stride
            for t, (dy, dx) in enumerate(i.taps):
                if i.op == CONV:
                    src = self.read(i.a, ys * sy + dy, xs * sx + dx, i.channels)
                else:  # the input position that scatters into (y, x) through tap t, if any
                    ry, rx = ys - dy, xs - dx
                    src = self.read(i.a, ry.div(sy, rounding_mode="floor"), rx.div(sx, rounding_mode="floor"),
                                    i.channels, (ry % sy == 0) & (rx % sx == 0))
                acc += src @ i.weight[t][:, lo:hi]
            out[:, at, lo:hi] = acc
            return
        o = slice(i.out_off + lo, i.out_off + hi)
        if i.op == FILL:
            out[:, at, o] = i.param
            return
        a = self.read(i.a, ys, xs, i.channels)
        if i.op == COPY:
            out[:, at, o] = a[..., lo:hi]
            return
        if i.op == ACT:
            v = _ACT_FNS[i.act](a, i.param)
        elif i.op == AFFINE:
            v = a * i.scale + i.shift
        elif i.op == ADD:
            b = self.read(i.b, ys, xs, i.channels)
            v = a + b if i.param == 1.0 else a + i.param * b
        elif i.op == MUL:
            v = a * self.read(i.b, ys, xs, i.channels)
        elif i.op == CONST:
            c = i.const[:, None] if i.const.dim() == 2 else i.const[:, ys, xs]
            v = a * c if i.multiply else a + c
        elif i.op == GATE:
            blocks = a.reshape(*a.shape[:2], i.data_channels, 2, -1)
            v = (torch.tanh(blocks[:, :, :, 0]) * torch.sigmoid(blocks[:, :, :, 1])).reshape(*a.shape[:2], -1)
        else:
            raise RuntimeError(f"unknown opcode {i.op}")
        out[:, at, o] = v[..., lo:hi]  # the whole position computed, the block's channels kept


@torch.no_grad()
def run_schedule_torch(prog, u, feed_table, *, temperature=1.0, images=None, progress=False):
    """Generate with the torch executor of a Schedule. ``u`` [H, W, C + 1, B]:
    the uniforms of the mixture draws ([H, W, C, B]: of the Bernoulli or
    categorical draws, one per channel); ``images`` (teacher forcing): feed
    these levels instead, and also return the parameters each step read,
    [B, K, H, W]. Returns (images int64 [B, C, H, W], parameters or None).
    Step t draws pixel t // g: all its channels (g = prog.pixel_steps = 1), or
    colour t % g of it from that colour's block of the output."""
    c, h, w = prog.shape
    g, n = prog.pixel_steps, prog.steps
    eng = ScheduleEngine(prog)
    b, k = prog.batch, prog.out_channels
    out_images = torch.zeros(b, c, h, w, dtype=torch.long, device=prog.device)
    params_out = None
    if images is not None:
        params_out = torch.zeros(b, k, h, w, dtype=prog.dtype, device=prog.device)
        images = images.to(prog.device).long()
    # the work of each step: (instruction, its positions), the queues moved to the device once
    work = [[] for _ in range(n)]
    for i in prog.code:
        start, queue = i.start.tolist(), i.queue.to(prog.device)
        for t in torch.nonzero(i.start[1:] > i.start[:-1]).flatten().tolist():
            work[t].append((i, queue[start[t]:start[t + 1]]))
    inp = eng.bufs[prog.input]
    rows, cols = torch.arange(h, device=prog.device), torch.arange(w, device=prog.device)  # the draw's positions
    bar = Progress(n, "sampling (cached, torch)", enabled=progress)
    try:
        for t in range(n):
            for i, pos in work[t]:
                eng.run(i, pos)
            p, colour = divmod(t, g)
            y, x = divmod(p, w)
            params = eng.read(prog.output, rows[y:y + 1], cols[x:x + 1], k)[:, 0]
            chans = list(range(c)) if g == 1 else [colour]  # the channels drawn at this step
            if images is not None:
                v = images[:, chans, y, x]
                sl = slice(0, k) if g == 1 else slice(colour * (k // g), (colour + 1) * (k // g))
                params_out[:, sl, y, x] = params[:, sl]
            elif prog.likelihood == "logistic-mixture":
                v = draw_mixture(params, u[y, x], c, prog.nr_mix, temperature)
            else:  # each channel from its own logits: channel ch, or block ch of L
                L = prog.levels
                logits = [params[:, ch] if prog.likelihood == "bernoulli" else params[:, ch * L:(ch + 1) * L]
                          for ch in chans]
                v = torch.stack([draw(lo, prog.likelihood, temperature, u[y, x, ch])
                                 for ch, lo in zip(chans, logits)], 1)
            out_images[:, chans, y, x] = v
            inp[:, p % inp.shape[1], chans] = feed_table[v]
            bar.update()
    finally:
        bar.close()
    return out_images, params_out
