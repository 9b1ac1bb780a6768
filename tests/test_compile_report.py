"""The Triton compile report (kernels/compile_report.py): its plans reach every kernel the launchers start, a
real ahead-of-time compile for sm_90 gives a row with ptxas's figures, and its failure rules and record.

(`make compile-report` runs the report itself; these tests check the report's machinery on this CPU.)"""
import inspect
import os

import pytest

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1",
                                reason="the report compiles real kernels: not under the interpreter")


@pytest.fixture(scope="module")
def report():
    pytest.importorskip("triton")
    from fastgen.kernels import compile_report
    return compile_report


def _jit_kernels():
    """'<module>.<name>' of every top-level @triton.jit kernel (a name ending in _kernel) in fastgen.kernels."""
    import triton

    from fastgen.kernels import batch_norm_act, dmol, gated, masked_conv, reparameterize_kl
    names = set()
    for mod in (dmol, gated, masked_conv, reparameterize_kl, batch_norm_act):
        for name, obj in inspect.getmembers(mod):
            if isinstance(obj, triton.runtime.JITFunction) and name.endswith("_kernel"):
                names.add(f"{mod.__name__.rsplit('.', 1)[-1]}.{name}")
    return names


@pytest.mark.parametrize("scope", ["ci", "full"])
def test_the_plans_start_every_kernel_in_every_dtype_for_both_archs(report, scope):
    jobs = report.plan_jobs(scope)
    assert {j.kernel for j in jobs} == _jit_kernels()
    first = {}
    for plan in report.PLANS:
        main = first.setdefault(plan.op, plan.name) == plan.name
        # ci: an op's first plan in every dtype for sm_90 (bf16 for sm_80 too), its later plans in bf16 for sm_90
        for dtype in plan.dtypes if scope == "full" or main else ["bf16"]:
            assert {j.arch for j in jobs if j.plan == plan.name and j.dtype == dtype} == (
                {90, 80} if scope == "full" or (main and dtype == "bf16") else {90}), (plan.name, dtype)


def test_the_full_scope_compiles_every_autotune_config(report):
    from fastgen.kernels import masked_conv
    configs = {j.config for j in report.plan_jobs("full") if j.kernel == "masked_conv._fwd_kernel"}
    assert len(configs) == len(masked_conv._fwd.configs)


def test_a_kernel_compiles_for_sm_90_with_no_gpu(report):
    # dmol's forward: it read a plain global float, which the interpreter allows and the compiler refused
    job = next(j for j in report.plan_jobs("ci") if j.kernel == "dmol._fwd_kernel" and j.arch == 90
               and j.dtype == "fp32")
    row = report.compile_one(job)
    assert row["ok"], row
    assert 0 < row["registers"] <= 255 and row["spill_stores"] == 0 and row["dot"] is False
    assert report.failures(row) == []


def test_ptxas_figures_are_read_from_its_log(report):
    log = ("ptxas info    : Function properties for k\n    32 bytes stack frame, 8 bytes spill stores, "
           "12 bytes spill loads\nptxas info    : Used 56 registers, used 1 barriers\n")
    assert report._ptxas_numbers(log) == (56, 8, 12, 32)
    with pytest.raises(RuntimeError, match="no ptxas -v figures"):
        report._ptxas_numbers("nothing")


def _row(**kw):
    row = dict(op="masked_conv2d", plan="p", kernel="masked_conv._fwd_kernel", config="BLOCK_M=64 w4 s3",
               dtype="bf16", arch="sm_80", triton="3.6.0", ok=True, registers=128, spill_stores=0, spill_loads=0,
               stack=0, shared=1024, dot=True, tensor_cores="mma", seconds=1.0, fixed_tiles=False)
    row.update(kw)
    return row


def test_the_failure_rules(report):
    assert report.failures(_row()) == []
    assert "shared memory" in report.failures(_row(shared=200 * 1024))[0]  # over sm_80's 163 KB
    assert report.failures(_row(shared=200 * 1024, arch="sm_90")) == []  # under sm_90's 227 KB
    assert report.failures(_row(spill_stores=8)) == []  # an autotune candidate: listed, not failed
    assert "spill" in report.failures(_row(spill_stores=8, fixed_tiles=True))[0]
    assert report.failures(dict(_row(), ok=False, error="CompilationError: x")) == ["CompilationError: x"]


def test_the_record_lists_an_arch_only_where_every_kernel_of_the_op_compiled(report):
    rows = [_row(), _row(arch="sm_90"), _row(arch="sm_90", kernel="masked_conv._grad_x_kernel", ok=False,
                                              error="x")]
    assert report.record_of([dict(triton="3.6.0", rows=rows)]) == {"triton": {"masked_conv2d": ["sm_80"]}}
