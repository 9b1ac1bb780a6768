import os

import pytest
import torch

from fastgen.ops.masked_conv import OP as MASKED_CONV


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def require_backend(op, name, call=None):
    """Skip a test whose backend cannot run here, unless the run says it must
    (``make test`` builds the extension and sets FASTGEN_REQUIRE=cpp)."""
    why = op.reason(name, call)
    if why is None:
        return
    if name in os.environ.get("FASTGEN_REQUIRE", "").split(","):
        pytest.fail(f"backend {name} is required in this run but unavailable: {why}")
    pytest.skip(f"backend {name}: {why}")


@pytest.fixture
def masked_conv_op():
    return MASKED_CONV
