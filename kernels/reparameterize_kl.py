"""Triton kernels of reparameterize_kl (spec: fastgen.ref.reparameterize_kl).

z = mu + exp(logvar/2) * eps and the Gaussian KL in one pass; eps is drawn in
registers from the seed and drawn again by the backward pass, so only the
inputs and outputs touch memory.

The noise: element i (row-major) is output i % 4 of ``tl.randn4x(seed, i // 4)``
(one Philox call makes four normals). A kernel works on tiles [G, 4] of flat
indices 4q + lane, q = one Philox counter per tile row, and picks the lane's
normal with three selects. A range that does not start on a multiple of 4 takes
the group that holds its first element and masks the elements before it.

* forward: grid (rows, splits). Program (b, s) walks its share of row b in
  tiles, writes z (and the elementwise KL), and one fp32 partial sum of the KL
  into partial[b, s]; torch adds the splits afterwards (deterministic, no
  atomics). Splits are only cut where rows are few and long.
* backward: a 1-D grid over tiles of the flat index; grad_kl per row is read
  at i // D.

Math in fp32 (fp64 for fp64 inputs), outputs in the input dtype; under
TRITON_INTERPRET=1 bf16 outputs are rounded by hand (its cast truncates).
"""
import torch
import triton
import triton.language as tl

from fastgen._seed import check_seed

from ._launch import INTERPRET, Launch, start
from .masked_conv import _round_out, _sm_count

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INT32_MAX = 2 ** 31 - 1


@triton.jit
def _normals(seed, q, lane):
    """[G, 4] normals: lane l of row g is output l of tl.randn4x(seed, q[g])."""
    n0, n1, n2, n3 = tl.randn4x(seed, q)
    lane = lane[None, :]
    return tl.where(lane == 0, n0[:, None], tl.where(lane == 1, n1[:, None], tl.where(lane == 2, n2[:, None],
                                                                                      n3[:, None])))


@triton.jit
def _kl_term(x, lv, pm_ptr, plv_ptr, idx, mask, PRIOR: tl.constexpr, ACC: tl.constexpr):
    v = tl.exp(lv)
    if PRIOR:
        d = x - tl.load(pm_ptr + idx, mask=mask, other=0).to(ACC)
        q = tl.load(plv_ptr + idx, mask=mask, other=0).to(ACC)
        term = 0.5 * (q - lv + (v + d * d) * tl.exp(-q) - 1.0)
    else:
        term = 0.5 * (v + x * x - 1.0 - lv)
    return term


@triton.jit
def _fwd_kernel(mu_ptr, lv_ptr, pm_ptr, plv_ptr, z_ptr, kl_ptr, partial_ptr, seed, D, cols_per_split, n_splits,
                PRIOR: tl.constexpr, ELEMENTWISE: tl.constexpr, ACC: tl.constexpr, CAST_F32: tl.constexpr,
                INT64: tl.constexpr, G: tl.constexpr):
    row = tl.program_id(0)
    split = tl.program_id(1)
    if INT64:
        row = row.to(tl.int64)
    start = row * D + split * cols_per_split
    end = row * D + tl.minimum(D, (split + 1) * cols_per_split)
    g = tl.arange(0, G)
    lane = tl.arange(0, 4)
    acc = tl.zeros([G, 4], dtype=ACC)
    for t in range(start - start % 4, end, 4 * G):
        q = t // 4 + g
        idx = 4 * q[:, None] + lane[None, :]
        mask = (idx >= start) & (idx < end)
        x = tl.load(mu_ptr + idx, mask=mask, other=0).to(ACC)
        lv = tl.load(lv_ptr + idx, mask=mask, other=0).to(ACC)
        eps = _normals(seed, q, lane).to(ACC)
        z = x + tl.exp(0.5 * lv) * eps
        tl.store(z_ptr + idx, _round_out(z, z_ptr.dtype.element_ty, CAST_F32), mask=mask)
        term = _kl_term(x, lv, pm_ptr, plv_ptr, idx, mask, PRIOR, ACC)
        if ELEMENTWISE:
            tl.store(kl_ptr + idx, _round_out(term, kl_ptr.dtype.element_ty, CAST_F32), mask=mask)
        else:
            acc += tl.where(mask, term, 0.0)
    if not ELEMENTWISE:
        tl.store(partial_ptr + row * n_splits + split, tl.sum(tl.sum(acc, 1), 0))


@triton.jit
def _bwd_kernel(mu_ptr, lv_ptr, pm_ptr, plv_ptr, gz_ptr, gk_ptr, gmu_ptr, glv_ptr, gpm_ptr, gplv_ptr, seed, N, D,
                PRIOR: tl.constexpr, HAS_GZ: tl.constexpr, HAS_GK: tl.constexpr, GK_ROWS: tl.constexpr,
                NEED_MU: tl.constexpr, NEED_LV: tl.constexpr, NEED_PM: tl.constexpr, NEED_PLV: tl.constexpr,
                ACC: tl.constexpr, CAST_F32: tl.constexpr, INT64: tl.constexpr, G: tl.constexpr):
    pid = tl.program_id(0)
    if INT64:
        pid = pid.to(tl.int64)
    q = pid * G + tl.arange(0, G)
    lane = tl.arange(0, 4)
    idx = 4 * q[:, None] + lane[None, :]
    mask = idx < N
    x = tl.load(mu_ptr + idx, mask=mask, other=0).to(ACC)
    lv = tl.load(lv_ptr + idx, mask=mask, other=0).to(ACC)
    gz = tl.zeros([G, 4], dtype=ACC)
    gk = tl.zeros([G, 4], dtype=ACC)
    if HAS_GZ:
        gz = tl.load(gz_ptr + idx, mask=mask, other=0).to(ACC)
    if HAS_GK:
        if GK_ROWS:
            gk = tl.load(gk_ptr + idx // D, mask=mask, other=0).to(ACC)
        else:
            gk = tl.load(gk_ptr + idx, mask=mask, other=0).to(ACC)
    d = x
    ip = tl.full([G, 4], 1.0, ACC)
    if PRIOR:
        d = x - tl.load(pm_ptr + idx, mask=mask, other=0).to(ACC)
        ip = tl.exp(-tl.load(plv_ptr + idx, mask=mask, other=0).to(ACC))
    v = tl.exp(lv)
    if NEED_MU:
        tl.store(gmu_ptr + idx, _round_out(gz + gk * d * ip, gmu_ptr.dtype.element_ty, CAST_F32), mask=mask)
    if NEED_LV:
        glv = gk * (v * ip - 1.0)
        if HAS_GZ:
            glv += gz * tl.exp(0.5 * lv) * _normals(seed, q, lane).to(ACC)
        tl.store(glv_ptr + idx, _round_out(0.5 * glv, glv_ptr.dtype.element_ty, CAST_F32), mask=mask)
    if NEED_PM:
        tl.store(gpm_ptr + idx, _round_out(-gk * d * ip, gpm_ptr.dtype.element_ty, CAST_F32), mask=mask)
    if NEED_PLV:
        tl.store(gplv_ptr + idx, _round_out(0.5 * gk * (1.0 - (v + d * d) * ip), gplv_ptr.dtype.element_ty,
                                            CAST_F32), mask=mask)


# ---- launchers -------------------------------------------------------------------------------------------------

def _check(who, mu, logvar, prior_mu, prior_logvar, seed):
    if mu.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{who}: mu must be float16, bfloat16, float32 or float64, got {mu.dtype}")
    if mu.dim() == 0:
        raise ValueError(f"{who}: mu must have a batch dimension, got a 0-d tensor")
    if (prior_mu is None) != (prior_logvar is None):
        raise ValueError(f"{who}: the kernels take both prior tensors or neither")
    for name, t in (("logvar", logvar), ("prior_mu", prior_mu), ("prior_logvar", prior_logvar)):
        if t is not None and (t.shape != mu.shape or t.dtype != mu.dtype or t.device != mu.device):
            raise ValueError(f"{who}: {name} must have mu's shape {tuple(mu.shape)}, dtype {mu.dtype} and device "
                             f"{mu.device}, got {tuple(t.shape)} {t.dtype} on {t.device}")
    check_seed(seed, who)
    return [t.contiguous() if t is not None else None for t in (mu, logvar, prior_mu, prior_logvar)]


def _acc(dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _math_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _rows(mu):
    b = mu.shape[0]
    return b, (mu.numel() // b if b else 0)


def _fwd_plan(B, D, device):
    """(G, cols_per_split, splits): tiles of 4G elements; a row is split only when rows are too few to fill
    the device (and each split keeps several tiles)."""
    # at most 256 rows of 4: G = 512 spills on sm_80 with the default 4 warps (the compile report)
    G = max(16, min(256, triton.next_power_of_2((D + 3) // 4 + 1)))
    if INTERPRET:
        G = min(G, 64)
    programs = 4 * _sm_count(device)
    splits = max(1, min(triton.cdiv(programs, max(B, 1)), triton.cdiv(D, 16 * 4 * G)))
    cols = triton.cdiv(triton.cdiv(D, splits), 4) * 4  # a multiple of 4: splits start on group boundaries
    return G, cols, triton.cdiv(D, cols)


def reparameterize_kl_forward(mu, logvar, prior_mu, prior_logvar, seed: int, elementwise: bool, *, launch=start):
    """(z, kl): kl elementwise in mu's dtype, or the per-row sums [B] in fp32 (fp64 for fp64). ``launch``: see
    kernels/_launch.py."""
    mu, logvar, prior_mu, prior_logvar = _check("reparameterize_kl (triton)", mu, logvar, prior_mu, prior_logvar,
                                                seed)
    B, D = _rows(mu)
    z = torch.empty_like(mu)
    if mu.numel() == 0:
        return z, (torch.empty_like(mu) if elementwise else torch.zeros(B, dtype=_math_dtype(mu.dtype),
                                                                          device=mu.device))
    G, cols, splits = _fwd_plan(B, D, mu.device)
    # elementwise: kl itself; else the fp32 (fp64) partial sums [B, splits]
    kl = torch.empty_like(mu) if elementwise else torch.empty((B, splits), dtype=_math_dtype(mu.dtype),
                                                              device=mu.device)
    prior = prior_mu is not None
    launch(Launch(_fwd_kernel, (B, splits),
                  (mu, logvar, prior_mu if prior else mu, prior_logvar if prior else mu, z, kl, kl, seed, D, cols,
                   splits),
                  dict(PRIOR=prior, ELEMENTWISE=elementwise, ACC=_acc(mu.dtype), CAST_F32=INTERPRET,
                       INT64=mu.numel() + 4 * G > _INT32_MAX, G=G)))
    if not elementwise:
        kl = kl.sum(1) if splits > 1 else kl.view(B)
    return z, kl


def reparameterize_kl_backward(grad_z, grad_kl, mu, logvar, prior_mu, prior_logvar, seed: int, output_mask, *,
                               launch=start):
    """(grad_mu, grad_logvar, grad_prior_mu, grad_prior_logvar); an entry not asked for (or a prior gradient
    without a prior) is empty. grad_kl: per row [B] or mu's shape, in fp32 (fp64 for fp64)."""
    who = "reparameterize_kl (triton)"
    mu, logvar, prior_mu, prior_logvar = _check(who, mu, logvar, prior_mu, prior_logvar, seed)
    if len(output_mask) != 4:
        raise ValueError(f"{who}: output_mask must have 4 entries, got {len(output_mask)}")
    B, D = _rows(mu)
    prior = prior_mu is not None
    need = [bool(output_mask[0]), bool(output_mask[1]), prior and bool(output_mask[2]), prior and bool(output_mask[3])]
    if grad_z is not None:
        if grad_z.shape != mu.shape or grad_z.dtype != mu.dtype:
            raise ValueError(f"{who}: grad_z must have mu's shape and dtype, got {tuple(grad_z.shape)} {grad_z.dtype}")
        grad_z = grad_z.contiguous()
    gk_rows = False
    if grad_kl is not None:
        gk_rows = grad_kl.dim() == 1 and grad_kl.shape[0] == B
        if grad_kl.dtype != _math_dtype(mu.dtype) or not (gk_rows or grad_kl.shape == mu.shape):
            raise ValueError(f"{who}: grad_kl must be {_math_dtype(mu.dtype)} of shape ({B},) or mu's shape, got "
                             f"{grad_kl.dtype} {tuple(grad_kl.shape)}")
        grad_kl = grad_kl.contiguous()
    outs = [torch.empty_like(mu) if n else mu.new_empty(0) for n in need]
    n = mu.numel()
    if n == 0 or not any(need):
        return tuple(outs)
    # 256 rows of 4 in fp64 spill with triton 3.6 (the compile report): 128 there
    G = 64 if INTERPRET else (128 if mu.dtype == torch.float64 else 256)
    dummy = mu
    launch(Launch(_bwd_kernel, (triton.cdiv(n, 4 * G),),
                  (mu, logvar, prior_mu if prior else dummy, prior_logvar if prior else dummy,
                   grad_z if grad_z is not None else dummy, grad_kl if grad_kl is not None else dummy,
                   *[o if nd else dummy for o, nd in zip(outs, need)], seed, n, D),
                  dict(PRIOR=prior, HAS_GZ=grad_z is not None, HAS_GK=grad_kl is not None, GK_ROWS=gk_rows,
                       NEED_MU=need[0], NEED_LV=need[1], NEED_PM=need[2], NEED_PLV=need[3], ACC=_acc(mu.dtype),
                       CAST_F32=INTERPRET, INT64=n + 4 * G > _INT32_MAX, G=G)))
    return tuple(outs)
