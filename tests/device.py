"""The torch device the conformance and op tests run on: ``pytest --device cuda`` (or the
``ATTNLAB_TEST_DEVICE`` environment variable); CPU by default, so CI needs no GPU."""

import os

import torch

DEVICE = torch.device(os.environ.get("ATTNLAB_TEST_DEVICE", "cpu"))

# Head dim of the op tests' inputs: compiled FlexAttention (the CUDA flex backend) refuses
# head dims below 16; the CPU runs keep the smaller, faster 8.
HEAD_DIM = 16 if DEVICE.type == "cuda" else 8
