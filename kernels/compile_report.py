"""The Triton compile report: every kernel a launcher starts, compiled ahead of time for Hopper and Ampere on a
machine with no GPU.

Each PLAN calls a public launcher of fastgen.kernels on meta tensors (no memory, real sizes: the GPU benchmark
shapes and the variants that change a kernel's constexprs) with a recorder for ``launch=`` (kernels/_launch.py),
so a kernel's signature, constexprs and grid come from the launcher itself. Every recorded kernel is compiled
in every config its autotuner can pick (or its launcher's fixed tiles), for every dtype its op takes, for
sm_90 and sm_80, through triton's own argument binder (the specialisation a GPU launch would make), then read
with the cuobjdump in triton's package: registers, spills (ptxas -v's spill stores), shared memory, and
for kernels that call tl.dot whether tensor-core instructions appear (HGMMA = wgmma on sm_90, HMMA = mma).

    python -m fastgen.kernels.compile_report run OUT.json        # this interpreter's triton, one JSON of rows
    python -m fastgen.kernels.compile_report table OUT.md A.json [B.json ...] [--record RECORD.json]

``table`` merges the triton versions into one markdown table (one row per kernel x config x dtype x arch),
lists the failures (a compile error; shared memory over the SM's limit; spills in a kernel whose launcher
fixes its tiles, i.e. the config every launch runs) and exits 1 if there is any. ``--record`` compares the
record of which ops compiled for which architecture (kernels/compiled.json, read by the dispatch: a Triton
backend is preferred on CUDA only for an architecture listed there) with what this report found, and fails on
any difference.
"""
import argparse
import concurrent.futures as futures
import contextlib
import hashlib
import io
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from typing import Callable, List, NamedTuple

import torch
import triton

from . import _launch, batch_norm_act, dmol, gated, masked_conv, reparameterize_kl

ARCHS = (90, 80)
# the most shared memory one block may use: 227 KB on sm_90 (H100/H200), 163 KB on sm_80 (A100)
SHARED_LIMIT = {90: 232448, 80: 166912}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}
RECORD_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "compiled.json")


class Plan(NamedTuple):
    """One launcher call: ``run(dtype, launch)`` calls it on meta tensors of ``dtype``."""
    op: str  # the dispatch op whose triton backend runs these kernels
    name: str
    dtypes: tuple  # the keys of DTYPES the op takes
    run: Callable


def _t(*shape, dtype, channels_last=False):
    t = torch.empty(shape, dtype=dtype, device="meta")
    return t.contiguous(memory_format=torch.channels_last) if channels_last else t


def _masked_conv(b, ci, co, hw, k, mask, dc, bias, channels_last=False):
    def run(dtype, launch):
        x = _t(b, ci, hw, hw, dtype=dtype, channels_last=channels_last)
        w = _t(co, ci, k, k, dtype=dtype)
        y = masked_conv.masked_conv2d_forward(x, w, _t(co, dtype=dtype) if bias else None, mask, dc, k // 2, 1,
                                              launch=launch)
        masked_conv.masked_conv2d_backward(torch.empty_like(y), x, w, mask, dc, k // 2, 1, [True, True, bias],
                                           launch=launch)
    return run


def _gated_act(b, c, hw, dc, cond):
    def run(dtype, launch):
        x = _t(b, 2 * c, hw, hw, dtype=dtype)
        cd = {None: None, "rows": _t(b, 2 * c, dtype=dtype), "full": _t(b, 2 * c, hw, hw, dtype=dtype)}[cond]
        y = gated.gated_activation_forward(x, cd, dc, launch=launch)
        gated.gated_activation_backward(torch.empty_like(y), x, cd, dc, [True, cd is not None], launch=launch)
    return run


def _gated_conv(b, ci, c, hw, stack, kh, kw, mask, dc, cond):
    def run(dtype, launch):
        x = _t(b, ci, hw, hw, dtype=dtype)
        w = _t(2 * c, ci, kh, kw, dtype=dtype)
        bias = _t(2 * c, dtype=dtype)
        cd = {None: None, "rows": _t(b, 2 * c, dtype=dtype), "full": _t(b, 2 * c, hw, hw, dtype=dtype)}[cond]
        y = gated.gated_conv2d_forward(x, w, bias, cd, stack, mask, dc, launch=launch)
        gated.gated_conv2d_backward(torch.empty_like(y), x, w, bias, cd, stack, mask, dc,
                                    [True, True, True, cd is not None], launch=launch)
    return run


def _dmol(b, c, hw, nr_mix):
    def run(dtype, launch):
        x = _t(b, c, hw, hw, dtype=torch.float32)
        p = _t(b, (10 if c == 3 else 3) * nr_mix, hw, hw, dtype=dtype)
        nll = dmol.dmol_nll_forward(x, p, nr_mix, launch=launch)
        dmol.dmol_nll_backward(torch.empty_like(nll), x, p, nr_mix, launch=launch)
    return run


def _rkl(b, d, prior, elementwise):
    def run(dtype, launch):
        mu, lv = _t(b, d, dtype=dtype), _t(b, d, dtype=dtype)
        pm, plv = (_t(b, d, dtype=dtype), _t(b, d, dtype=dtype)) if prior else (None, None)
        reparameterize_kl.reparameterize_kl_forward(mu, lv, pm, plv, 0, elementwise, launch=launch)
        math = torch.float64 if dtype == torch.float64 else torch.float32  # grad_kl's dtype, per row or element
        gk = _t(b, d, dtype=math) if elementwise else _t(b, dtype=math)
        reparameterize_kl.reparameterize_kl_backward(_t(b, d, dtype=dtype), gk, mu, lv, pm, plv, 0,
                                                     [True, True, prior, prior], launch=launch)
    return run


def _bna(b, c, hw, activation, channels_last=False, training=True):
    """Forward and backward of batch_norm_act; leaky_relu's backward from the output (the saved tensor), relu's
    from the input; evaluation: the given statistics, no statistics kernel."""
    def run(dtype, launch):
        x = _t(b, c, hw, hw, dtype=dtype, channels_last=channels_last)
        w, bias = _t(c, dtype=dtype), _t(c, dtype=dtype)
        math = torch.float64 if dtype == torch.float64 else torch.float32
        stats = (None, None) if training else (_t(c, dtype=math), _t(c, dtype=math))
        y, mean, var = batch_norm_act.batch_norm_act_forward(x, w, bias, *stats, 1e-5, activation, 0.2, launch=launch)
        from_y = activation == "leaky_relu"
        batch_norm_act.batch_norm_act_backward(torch.empty_like(y), y if from_y else x, from_y, w, bias, mean, var,
                                               1e-5, training, activation, 0.2, [True, True, True], launch=launch)
    return run


CONV_DTYPES = ("fp32", "fp16", "bf16")
# The GPU benchmark shapes (benchmarks/RESULTS.md) and the variants that change a kernel's constexprs: mask A/B,
# RGB centre rule, bias, channels_last, the stacks, the conditioning modes, grey/RGB mixtures, priors.
PLANS = [
    Plan("masked_conv2d", "64x128->128 32x32 7x7 A", CONV_DTYPES, _masked_conv(64, 128, 128, 32, 7, "A", 1, True)),
    Plan("masked_conv2d", "64x128->128 32x32 3x3 B", CONV_DTYPES, _masked_conv(64, 128, 128, 32, 3, "B", 1, True)),
    Plan("masked_conv2d", "128x256->256 32x32 3x3 B", CONV_DTYPES,
         _masked_conv(128, 256, 256, 32, 3, "B", 1, False)),
    Plan("masked_conv2d", "16x3->96 32x32 7x7 A RGB channels_last", CONV_DTYPES,
         _masked_conv(16, 3, 96, 32, 7, "A", 3, True, channels_last=True)),
    Plan("masked_conv2d", "16x96->96 32x32 3x3 B RGB", CONV_DTYPES, _masked_conv(16, 96, 96, 32, 3, "B", 3, False)),
    Plan("gated_activation", "64x128 32x32", CONV_DTYPES, _gated_act(64, 128, 32, 1, None)),
    Plan("gated_activation", "64x96 32x32 RGB, cond per row", CONV_DTYPES, _gated_act(64, 96, 32, 3, "rows")),
    Plan("gated_activation", "16x64 28x28, full cond", CONV_DTYPES, _gated_act(16, 64, 28, 1, "full")),
    Plan("gated_conv2d", "64x128 32x32 vertical 2x3", CONV_DTYPES,
         _gated_conv(64, 128, 128, 32, "vertical", 2, 3, "B", 1, None)),
    Plan("gated_conv2d", "64x128 32x32 horizontal 1x2 B, cond per row", CONV_DTYPES,
         _gated_conv(64, 128, 128, 32, "horizontal", 1, 2, "B", 1, "rows")),
    Plan("gated_conv2d", "128x256 32x32 horizontal 1x4 A RGB, full cond", CONV_DTYPES,
         _gated_conv(128, 255, 255, 32, "horizontal", 1, 4, "A", 3, "full")),
    Plan("discretized_mix_logistic_nll", "64x3x32x32 nr_mix 10", CONV_DTYPES, _dmol(64, 3, 32, 10)),
    Plan("discretized_mix_logistic_nll", "16x1x28x28 nr_mix 5", CONV_DTYPES, _dmol(16, 1, 28, 5)),
    Plan("reparameterize_kl", "4096x512, N(0, 1) prior, sum", CONV_DTYPES + ("fp64",), _rkl(4096, 512, False, False)),
    Plan("reparameterize_kl", "65536x1024, N(0, 1) prior, sum", CONV_DTYPES + ("fp64",),
         _rkl(65536, 1024, False, False)),
    Plan("reparameterize_kl", "100x37, learned prior, elementwise", CONV_DTYPES + ("fp64",),
         _rkl(100, 37, True, True)),
    Plan("batch_norm_act", "128x256 16x16 leaky_relu", CONV_DTYPES + ("fp64",), _bna(128, 256, 16, "leaky_relu")),
    Plan("batch_norm_act", "128x256 16x16 relu", CONV_DTYPES + ("fp64",), _bna(128, 256, 16, "relu")),
    Plan("batch_norm_act", "64x64 32x32 leaky_relu channels_last", CONV_DTYPES,
         _bna(64, 64, 32, "leaky_relu", channels_last=True)),
    Plan("batch_norm_act", "16x7 5x5 relu, evaluation", CONV_DTYPES, _bna(16, 7, 5, "relu", training=False)),
]
# fp32 convolutions again with torch's float32 matmul precision at "high": tl.dot in TF32 on the tensor cores
TF32_OPS = ("masked_conv2d", "gated_conv2d")


# ---- planning: what the launchers start ---------------------------------------------------------------------

class Job(NamedTuple):
    """One compile: a kernel in one config for one architecture."""
    plan: str
    op: str
    dtype: str  # fp32, fp16, bf16, fp64, or "tf32" (fp32 tensors, TF32 dots)
    kernel: str
    config: str
    arch: int
    fn: object  # the @triton.jit function
    args: tuple
    kwargs: dict  # the launcher's constexprs and the config's
    autotuned: bool  # False: the launcher fixes the tiles, every launch runs this config


def _config_text(kwargs, num_warps, num_stages):
    tiles = " ".join(f"{k}={v}" for k, v in sorted(kwargs.items()))
    return f"{tiles} w{num_warps} s{num_stages}".strip()


SCOPES = ("full", "ci")


def plan_jobs(scope="full"):
    """Every compile the report makes (before deduplication).

    ``full``: every plan in every dtype for both archs; an autotuned kernel in every config in the first plan
    that starts it in that dtype, and in its first config in the later plans (other constexprs: a config's
    resources barely move with the shape). ``ci`` (what `make test` runs in CI's time): the first plan of each op
    in every dtype for sm_90 and in bf16 for sm_80 too, the later plans in bf16 for sm_90, an autotuned kernel
    in its first config only."""
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    jobs, every_config, first_plan = [], set(), {}
    for plan in PLANS:
        main = first_plan.setdefault(plan.op, plan.name) == plan.name
        variants = [(d, "highest") for d in plan.dtypes]
        if plan.op in TF32_OPS:
            variants.append(("tf32", "high"))
        if scope == "ci" and not main:
            variants = [("bf16", "highest")]
        for dtype, precision in variants:
            launches: List[_launch.Launch] = []
            before = torch.get_float32_matmul_precision()
            torch.set_float32_matmul_precision(precision)
            try:
                plan.run(DTYPES["fp32" if dtype == "tf32" else dtype], launches.append)
            finally:
                torch.set_float32_matmul_precision(before)
            for ln in launches:
                fn = _launch.jit_function(ln.kernel)
                name = _launch.kernel_name(ln.kernel)
                autotuned = isinstance(ln.kernel, triton.runtime.Autotuner)
                if autotuned:
                    configs = [(dict(c.kwargs), c.num_warps, c.num_stages) for c in ln.kernel.configs]
                    if (name, dtype) in every_config or scope == "ci":
                        configs = configs[:1]
                    every_config.add((name, dtype))
                else:  # fixed tiles: triton's defaults for warps and stages
                    configs = [({}, 4, 3)]
                for tiles, nw, ns in configs:
                    kwargs = dict(ln.consts, **tiles, num_warps=nw, num_stages=ns)
                    for arch in ARCHS if scope == "full" or (main and dtype == "bf16") else ARCHS[:1]:
                        jobs.append(Job(plan.name, plan.op, dtype, name, _config_text(tiles, nw, ns), arch, fn,
                                        ln.args, kwargs, autotuned))
    return jobs


def _specialise(job):
    """(target, signature, constexprs, attrs, options) as triton's JIT makes them for this call on job.arch."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", job.arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(job.fn.signature, job.fn.params, backend)
    bound, specialization, options = binder(*job.args, **job.kwargs)
    options, signature, constexprs, attrs = job.fn._pack_args(backend, dict(job.kwargs), bound, specialization,
                                                              options)
    return target, signature, constexprs, attrs, options


def _key(job):
    """What decides the compiled code: the kernel's source (with what it calls), the specialisation, the arch."""
    target, signature, constexprs, attrs, options = _specialise(job)
    text = repr((triton.__version__, job.fn.cache_key, sorted(signature.items()), sorted(constexprs.items()),
                 sorted((k, repr(v)) for k, v in attrs.items()), sorted(options.__dict__.items()), job.arch))
    return hashlib.sha256(text.encode()).hexdigest()[:24]


# ---- compiling and reading the cubin --------------------------------------------------------------------------

def _tool(name):
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def _sass(cubin):
    """The SASS of a cubin, from the cuobjdump in triton's package."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([_tool("cuobjdump"), "--dump-sass", f.name], check=True, capture_output=True,
                              text=True).stdout


def _ptxas_numbers(log):
    """(registers, spill store bytes, spill load bytes, stack bytes) from ptxas -v's log."""
    regs = re.search(r"Used (\d+) registers", log)
    spill = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if not regs or not spill:
        raise RuntimeError(f"no ptxas -v figures in its log: {log[:300]!r}")
    return int(regs.group(1)), int(spill.group(2)), int(spill.group(3)), int(spill.group(1))


@contextlib.contextmanager
def _environ(**values):
    """os.environ with ``values`` set, as it was afterwards."""
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def compile_one(job):
    """One row of the report (a dict) for ``job``."""
    row = dict(op=job.op, plan=job.plan, kernel=job.kernel, config=job.config, dtype=job.dtype,
               arch=f"sm_{job.arch}", triton=triton.__version__)
    from triton.compiler import ASTSource
    log = io.StringIO()
    t0 = time.perf_counter()
    try:
        target, signature, constexprs, attrs, options = _specialise(job)
        # compile even what triton's cache holds (the rows' cache stands for it), and print ptxas -v's log
        with _environ(TRITON_ALWAYS_COMPILE="1", TRITON_DUMP_PTXAS_LOG="1"), contextlib.redirect_stdout(log):
            compiled = triton.compile(ASTSource(job.fn, signature, constexprs, attrs), target=target,
                                      options=options.__dict__)
    except Exception as e:  # noqa: BLE001 - any compile failure is a row of the report, not a crash of it
        first = str(e).strip().splitlines()
        row.update(ok=False, error=f"{type(e).__name__}: {first[0] if first else ''}"[:300],
                   seconds=round(time.perf_counter() - t0, 2))
        return row
    seconds = time.perf_counter() - t0
    regs, spill_stores, spill_loads, stack = _ptxas_numbers(log.getvalue())
    dot = "tt.dot" in compiled.asm["ttir"]
    tensor_cores = None
    if dot:
        sass = _sass(compiled.asm["cubin"])
        tensor_cores = "wgmma" if "HGMMA" in sass else ("mma" if "HMMA" in sass else "none")
    row.update(ok=True, registers=regs, spill_stores=spill_stores, spill_loads=spill_loads, stack=stack,
               shared=int(compiled.metadata.shared), dot=dot, tensor_cores=tensor_cores, seconds=round(seconds, 2),
               fixed_tiles=not job.autotuned)
    return row


_JOBS = []  # set before the worker processes fork: they read their jobs from it by index


def _compile_index(i):
    return compile_one(_JOBS[i])


def run(out, scope="full", workers=None, cache=None):
    """Compile every job of ``scope`` (each distinct specialisation once) with this interpreter's triton; write
    the rows."""
    jobs = plan_jobs(scope)
    keyed = [(_key(j), j) for j in jobs]
    old = {}
    if cache and os.path.exists(cache):
        with open(cache) as f:
            old = json.load(f)
    todo = {}  # key -> index of the first job with it
    for i, (key, _) in enumerate(keyed):
        if key not in old and key not in todo:
            todo[key] = i
    print(f"compile report ({scope}), triton {triton.__version__}: {len(jobs)} kernel launches x configs x archs, "
          f"{len(set(k for k, _ in keyed))} distinct compiles, {len(todo)} not in the cache", flush=True)
    t0 = time.perf_counter()
    results = dict(old)
    workers = workers or os.cpu_count() or 1
    _JOBS[:] = jobs
    with futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
        for i, (key, row) in enumerate(zip(todo, pool.map(_compile_index, todo.values()))):
            results[key] = row
            if (i + 1) % 50 == 0:
                print(f"  {i + 1} / {len(todo)} compiled ({time.perf_counter() - t0:.0f} s)", flush=True)
    print(f"  compiled in {time.perf_counter() - t0:.0f} s", flush=True)
    if cache:
        with open(cache, "w") as f:  # every row it holds: a ci run keeps a full run's
            json.dump(results, f)
    rows = []
    for key, job in keyed:
        row = dict(results[key], plan=job.plan, op=job.op)
        rows.append(row)
    with open(out, "w") as f:
        json.dump(dict(triton=triton.__version__, scope=scope, rows=rows), f)


# ---- the table, the failures and the record -------------------------------------------------------------------

def failures(row):
    """Why ``row`` fails the report (empty if it does not)."""
    if not row["ok"]:
        return [row["error"]]
    why = []
    limit = SHARED_LIMIT[int(row["arch"][3:])]
    if row["shared"] > limit:
        why.append(f"{row['shared']} bytes of shared memory, the SM has {limit}")
    if row["fixed_tiles"] and row["spill_stores"]:
        why.append(f"{row['spill_stores']} spill stores in the tiles every launch uses")
    return why


def record_of(reports):
    """{"triton": {op: [archs]}}: the archs where every kernel of the op compiled, in every report, without
    failing."""
    ops = {}
    for rep in reports:
        for row in rep["rows"]:
            ok = ops.setdefault(row["op"], {}).setdefault(row["arch"], True)
            ops[row["op"]][row["arch"]] = ok and not failures(row)
    return {"triton": {op: sorted(a for a, ok in archs.items() if ok) for op, archs in sorted(ops.items())}}


def table(out, paths, record=None):
    reports = []
    for p in paths:
        with open(p) as f:
            reports.append(json.load(f))
    versions = [r["triton"] for r in reports]
    groups = {}
    for rep in reports:
        for row in rep["rows"]:
            k = (row["kernel"], row["config"], row["dtype"], row["arch"])
            groups.setdefault(k, {}).setdefault(rep["triton"], []).append(row)
    bad = []
    lines = [f"# Triton compile report (triton {', '.join(versions)}; written by `make compile-report`)", "",
             "One row per kernel x config x dtype x arch, over every launch of the plans in "
             "kernels/compile_report.py (max registers, spill stores, max shared memory, tensor cores, total compile "
             "seconds, per triton version).", "",
             "| kernel | config | dtype | arch | " + " | ".join(
                 f"{v}: regs / spills / smem KB / tc / s" for v in versions) + " |",
             "|---|---|---|---|" + "---|" * len(versions)]
    for (kernel, config, dtype, arch), by_version in sorted(groups.items()):
        cells = []
        for v in versions:
            rows = by_version.get(v, [])
            for r in rows:
                for why in failures(r):
                    bad.append(f"{kernel} [{config}] {dtype} {arch} triton {v} ({r['plan']}): {why}")
            okr = [r for r in rows if r["ok"]]
            if not rows:
                cells.append("-")
            elif len(okr) < len(rows):
                cells.append("**FAILED**")
            else:
                tc = sorted({r["tensor_cores"] for r in okr if r["tensor_cores"]})
                cells.append(f"{max(r['registers'] for r in okr)} / {max(r['spill_stores'] for r in okr)} / "
                             f"{max(r['shared'] for r in okr) / 1024:.1f} / {','.join(tc) or '-'} / "
                             f"{sum(r['seconds'] for r in okr):.1f}")
        lines.append(f"| {kernel} | {config} | {dtype} | {arch} | " + " | ".join(cells) + " |")
    summary = summarise(reports)
    lines[3:3] = summary + [""]
    with open(out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(summary))
    print(f"table: {out} ({len(groups)} rows)")
    status = 0
    if bad:
        print(f"{len(bad)} failures:\n  " + "\n  ".join(sorted(set(bad))))
        status = 1
    if record:
        found = record_of(reports)
        with open(record) as f:
            committed = json.load(f)
        if committed.get("triton") != found["triton"]:
            print(f"the record {record} (which ops the dispatch may prefer triton for, per arch) differs from "
                  f"this report's:\n{json.dumps(found, indent=1)}\nupdate the record if the change is intended")
            status = 1
    return status


def summarise(reports):
    """A few lines per triton version: counts, compile time, spills, tensor cores."""
    out = []
    for rep in reports:
        rows = rep["rows"]
        ok = [r for r in rows if r["ok"]]
        dots = [r for r in ok if r["dot"] and r["dtype"] != "fp32"]
        spilling = sorted({(r["kernel"], r["config"], r["dtype"], r["arch"]) for r in ok if r["spill_stores"]})
        no_tc = sorted({(r["kernel"], r["dtype"], r["arch"]) for r in dots if r["tensor_cores"] == "none"})
        distinct = {(r["kernel"], r["config"], r["dtype"], r["arch"], r["plan"]) for r in rows}
        out.append(f"- triton {rep['triton']}: {len(distinct)} compiles ({len(rows) - len(ok)} failed), "
                   f"{sum(r['seconds'] for r in ok):.0f} s of compile time; max registers "
                   f"{max((r['registers'] for r in ok), default=0)}, max shared memory "
                   f"{max((r['shared'] for r in ok), default=0) / 1024:.1f} KB; {len(spilling)} kernel x config x "
                   f"dtype x arch with spills{': ' + '; '.join(' '.join(s) for s in spilling[:12]) if spilling else ''}"
                   f"{' ...' if len(spilling) > 12 else ''}; tensor-core instructions in every fp16/bf16/tf32 tl.dot "
                   f"kernel" + (f" except {no_tc}" if no_tc else ""))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m fastgen.kernels.compile_report", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="compile every kernel with this interpreter's triton")
    r.add_argument("out")
    r.add_argument("--scope", choices=SCOPES, default="full", help="see plan_jobs (default: full)")
    r.add_argument("--cache", help="a JSON of rows from earlier runs (reused for unchanged kernels)")
    r.add_argument("--workers", type=int)
    t = sub.add_parser("table", help="merge runs into a markdown table; exit 1 on any failure")
    t.add_argument("out")
    t.add_argument("runs", nargs="+")
    t.add_argument("--record", help="the committed record to check (kernels/compiled.json)")
    a = p.parse_args(argv)
    if a.cmd == "run":
        run(a.out, a.scope, a.workers, a.cache)
        return 0
    return table(a.out, a.runs, a.record)


if __name__ == "__main__":
    sys.exit(main())
