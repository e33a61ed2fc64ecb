import os

import pytest
import torch


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
