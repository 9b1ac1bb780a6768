"""`make cuda-build`'s check of the CUDA build of fastgen._C, on a machine with no GPU.

Run by the CUDA torch of .venv-cuda on the build in build-cuda/ (never the CPU
build in the tree):

    python -P benchmarks/cuda_build_check.py BUILD_LOG OUT_MD

1. fastgen imports from the CUDA build, and _C says it was built with CUDA;
2. every op that csrc/cuda/*_glue.cpp registers for CUDA (`m.impl("name", ...)`
   inside TORCH_LIBRARY_IMPL(fastgen, CUDA, ...): read from the sources, not a
   list kept here) has a CUDA kernel in the dispatcher;
3. fastgen.backends() says "no CUDA device" for each CUDA backend, and nothing worse;
4. ptxas's report of each CUDA kernel (the build ran with FASTGEN_PTXAS_VERBOSE=1;
   kept per .cu file next to OUT_MD, so an incremental build keeps the files it
   did not recompile) becomes a table: registers, spills, stack frame, shared
   memory, per arch.
Exit status 1 when 1-3 fail or the log holds no kernel.
"""
import glob
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cuda_ops():
    """The op names csrc/cuda's glue files register for the CUDA dispatch key."""
    names = []
    for path in sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*_glue.cpp"))):
        text = open(path).read()
        for block in re.findall(r"TORCH_LIBRARY_IMPL\(fastgen,\s*CUDA,\s*m\)\s*\{(.*?)\n\}", text, re.S):
            names += re.findall(r'm\.impl\("([a-z0-9_]+)"', block)
    return names


def keep_ptxas_reports(log, folder):
    """Each .cu file's ptxas report from this build's log into ``folder``/<file>.log (a file this build did not
    recompile keeps its earlier report, so an incremental build still has every kernel); all reports, joined."""
    os.makedirs(folder, exist_ok=True)
    current, parts = None, {}
    for line in log.splitlines():
        m = re.search(r"nvcc .* -c \S*?/csrc/cuda/(\w+)\.cu ", line)
        if m:
            current = m.group(1)
            parts[current] = []
        elif current is not None and line.startswith(("ptxas", " ")):
            parts[current].append(line)
    for name, lines in parts.items():
        with open(os.path.join(folder, f"{name}.log"), "w") as f:
            f.write("\n".join(lines) + "\n")
    return "".join(open(p).read() for p in sorted(glob.glob(os.path.join(folder, "*.log"))))


def ptxas_table(log):
    """[(kernel, arch, registers, spill stores, spill loads, stack, smem)] from an nvcc -Xptxas=-v build log."""
    rows, current = [], None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '([^']+)' for '(sm_\d+)'", line)
        if m:
            current = {"mangled": m.group(1), "arch": m.group(2), "regs": 0, "spill_st": 0, "spill_ld": 0,
                       "stack": 0, "smem": 0}
            rows.append(current)
            continue
        if current is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            current["stack"], current["spill_st"], current["spill_ld"] = map(int, m.groups())
        m = re.search(r"Used (\d+) registers", line)
        if m:
            current["regs"] = int(m.group(1))
            s = re.search(r"(\d+) bytes smem", line)
            current["smem"] = int(s.group(1)) if s else 0
    names = subprocess.run(["c++filt"], input="\n".join(r["mangled"] for r in rows), capture_output=True,
                           text=True).stdout.splitlines() if rows else []
    for r, name in zip(rows, names):
        # void fastgen::cuda::(anonymous namespace)::conv_tiled<float>(...) -> conv_tiled<float>
        short = re.sub(r"\(.*", "", name.replace("(anonymous namespace)::", "").removeprefix("void "))
        r["kernel"] = re.sub(r"^.*::", "", short)
        source = re.search(r"_\d+_([a-z_]+?)_cu_", r["mangled"])  # the .cu file, in an anonymous namespace's name
        r["file"] = f"{source.group(1)}.cu" if source else ""
    return rows


def main(log_path, out_path):
    failures = []
    import torch
    import fastgen
    from fastgen import _C
    where = os.path.dirname(fastgen.__file__)
    print(f"fastgen from {where}; torch {torch.__version__} (CUDA {torch.version.cuda}); device present: "
          f"{torch.cuda.is_available()}")
    if not _C.built_with_cuda():
        failures.append("fastgen._C was built without CUDA")
    ops = cuda_ops()
    if not ops:
        failures.append("no TORCH_LIBRARY_IMPL(fastgen, CUDA) registrations found in csrc/cuda/*_glue.cpp")
    for name in ops:
        has = torch._C._dispatch_has_kernel_for_dispatch_key(f"fastgen::{name}", "CUDA")
        print(f"  torch.ops.fastgen.{name}: CUDA kernel {'registered' if has else 'MISSING'}")
        if not has:
            failures.append(f"fastgen::{name} has no CUDA kernel")
    for entry in ("sample_scheduled",):  # the engine's entry picks the CUDA engine by device
        if not hasattr(_C, entry):
            failures.append(f"fastgen._C.{entry} is missing")
    info = fastgen.backends()
    if not torch.cuda.is_available():
        want = "no CUDA device"
        if info["extension"]["cuda"] != want:
            failures.append(f"backends()['extension']['cuda'] = {info['extension']['cuda']!r}, want {want!r}")
        for op, status in info["ops"].items():
            why = status.get("cuda", want)
            if why != want:
                failures.append(f"backends(): op {op} backend cuda says {why!r}, want {want!r}")
        print(f"  fastgen.backends(): every CUDA backend says {want!r}" if not any("backends()" in f for f in failures)
              else "  fastgen.backends(): see the failures below")

    rows = ptxas_table(keep_ptxas_reports(open(log_path).read(), os.path.join(os.path.dirname(out_path), "ptxas")))
    if not rows:
        failures.append(f"{log_path} holds no ptxas kernel report (build with FASTGEN_PTXAS_VERBOSE=1)")
    lines = ["| file | kernel | arch | registers | spill stores / loads (bytes) | stack (bytes) | shared (bytes) |",
             "|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["file"], r["kernel"], r["arch"])):
        lines.append(f"| {r['file']} | `{r['kernel']}` | {r['arch']} | {r['regs']} | {r['spill_st']} / "
                     f"{r['spill_ld']} | {r['stack']} | {r['smem']} |")
    with open(out_path, "w") as f:
        f.write(f"CUDA kernels of fastgen._C (ptxas -v; torch {torch.__version__}, "
                f"TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST', '')})\n\n" + "\n".join(lines) + "\n")
    spilling = sorted({(r["kernel"], r["arch"]) for r in rows if r["spill_st"] or r["spill_ld"]})
    archs = sorted({r["arch"] for r in rows})
    print(f"  {len(rows)} kernel builds over {', '.join(archs)}: max {max((r['regs'] for r in rows), default=0)} "
          f"registers, max {max((r['smem'] for r in rows), default=0)} bytes static shared memory; "
          f"spilling: {', '.join(f'{k} ({a})' for k, a in spilling) or 'none'}; table in {out_path}")
    for f in failures:
        print(f"FAILED: {f}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
