"""A description of the machine a result was measured on (recorded with every result)."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def machine() -> dict:
    """Host, CPU model, cores, torch threads and versions, and the GPU if one is used."""
    import torch

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"host": platform.node(), "cpu": cpu, "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "platform": platform.platform()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def describe(m: dict) -> str:
    """One line: 'AMD EPYC ... (2 cores), torch 2.13.0, Python 3.11.7, Linux-...'."""
    gpu = f", GPU {m['gpu']}" if m.get("gpu") else ""
    return (f"{m['cpu']} ({m['cores']} cores){gpu}, torch {m['torch']}, Python {m['python']}, "
            f"{m['platform']}")
