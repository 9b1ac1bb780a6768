"""The package as a user gets it: an installed (not editable) build imports,
kernels/ lands as fastgen.kernels and never as a top-level `kernels`, and a
pure-Python install (FASTGEN_SKIP_EXT=1) works and says the extension is missing."""
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_installed_pure_python_build(tmp_path):
    env = dict(os.environ, FASTGEN_SKIP_EXT="1")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q", "-w",
                    str(tmp_path / "dist"), str(ROOT)], check=True, env=env, cwd=tmp_path)
    wheel = next((tmp_path / "dist").glob("fastgen-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "fastgen/kernels/__init__.py" in names
    assert not any(n.startswith("kernels/") for n in names), "a top-level kernels package would be installed"
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", str(target),
                    str(wheel)], check=True, cwd=tmp_path)
    code = ("import fastgen, fastgen.kernels, torch;"
            "assert fastgen.__file__.startswith(%r), fastgen.__file__;"
            "assert fastgen.kernels.__file__.startswith(%r);"
            "info = fastgen.backends(); print(info['extension']['cpp']);"
            "y = fastgen.MaskedConv2d('A', 1, 2, 3, padding=1)(torch.randn(1, 1, 4, 4)); print(tuple(y.shape))"
            % (str(target), str(target)))
    # -S: no .pth files, so the development checkout's editable install cannot answer for fastgen
    import site
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(target)] + site.getsitepackages()))
    out = subprocess.run([sys.executable, "-S", "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "not built" in out.stdout and "(1, 2, 4, 4)" in out.stdout


def test_no_top_level_kernels_module_in_the_package_config():
    import fastgen.kernels
    assert fastgen.kernels.__name__ == "fastgen.kernels"
    setup = (ROOT / "setup.py").read_text()
    assert '"fastgen.kernels": "kernels"' in setup
