"""The torch device the conformance and op tests run on: ``pytest --device cuda`` (or the
``ATTNLAB_TEST_DEVICE`` environment variable); CPU by default, so CI needs no GPU."""

import os

import torch

DEVICE = torch.device(os.environ.get("ATTNLAB_TEST_DEVICE", "cpu"))
