"""pytest setup of the benchmarks: collect ``bench_*.py``, tell the benchmarks
whether this is a smoke run, and print a compact table at the end of a real run.

``pytest benchmarks/ -q --benchmark-disable``   smoke run: tiny shapes, each contender
                                                checked against the float64 reference, run once
``pytest benchmarks/ --benchmark-only``         the real run (realistic shapes, timed)
"""
import fnmatch

import pytest

from harness import format_table, table_rows

_RESULTS = pytest.StashKey()


def pytest_collect_file(file_path, parent):
    """Collect benchmarks/bench_*.py as test modules (pyproject's python_files
    stays test_*.py; explicitly named files are collected by pytest itself)."""
    if file_path.suffix != ".py" or not file_path.name.startswith("bench_"):
        return None
    if parent.session.isinitpath(file_path):
        return None
    if any(fnmatch.fnmatch(file_path.name, p) for p in parent.config.getini("python_files")):
        return None
    return pytest.Module.from_parent(parent, path=file_path)


def pytest_configure(config):
    config.stash[_RESULTS] = []


@pytest.fixture(scope="session")
def smoke(request):
    """True under --benchmark-disable: tiny shapes, one call per contender, no memory subprocesses."""
    return bool(request.config.getoption("benchmark_disable", False))


@pytest.fixture(scope="session")
def bench_results(request):
    """Records {group, contender, median_s, extra_info} for the end-of-run table."""
    return request.config.stash[_RESULTS]


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    results = config.stash.get(_RESULTS, [])
    if not any(r.get("median_s") for r in results):
        return
    terminalreporter.write_sep("-", "fastgen benchmarks: median per contender, speedup vs the common implementation (sampling: vs naive)")
    terminalreporter.write_line(format_table(table_rows(results)))
    terminalreporter.write_line("memory MB: CPU, peak RSS of the measured work (fwd+bwd steps; sampling: one naive "
                                "step, one cached run) above the RSS before it (fresh subprocess); GPU, peak "
                                "allocated above the allocated before it. "
                                "compile s: torch.compile's first call minus the median (not in the timing)")
