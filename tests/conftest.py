import os

import pytest
import torch

# The Triton kernels' tests (tests/triton) run the kernels in Triton's interpreter on a
# machine without CUDA. triton.jit reads TRITON_INTERPRET when a kernel is defined, so it is
# set here, before any test module can import a kernel module (set in tests/triton's
# conftest, it came after other directories' tests had imported them, and the kernels then
# mixed compiled and interpreted functions when the whole suite ran with triton installed).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_addoption(parser):
    parser.addoption("--device", default=None,
                     help="torch device for the conformance and op tests (default cpu; "
                          "e.g. cuda on a GPU machine)")


def pytest_configure(config):
    device = config.getoption("--device")
    if device is not None:  # read by tests/device.py, which test modules import later
        torch.empty(0, device=device)  # an unusable device fails here, not in every test
        os.environ["ATTNLAB_TEST_DEVICE"] = device
        # fp32 tests check fp32 arithmetic: no TF32 in matmuls or (cuDNN) convolutions
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
