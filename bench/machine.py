"""What machine a benchmark ran on, for its JSON records and printed header.

Figures from different machines are not comparable: 2-vCPU VMs that all report "AMD EPYC" can
be different CPU generations (family 23 model 1 runs MKL's single-thread SGEMM at ~30 GFLOP/s,
family 25 model 17 at ~90), so the family and model go into every record.
``platform.processor()`` is empty on most Linux builds, so read ``/proc/cpuinfo``.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path


def describe() -> dict[str, str | int]:
    """``{"cpu", "cpu_family", "cpu_model", "cpus", "l3_cache", "python", "torch",
    "expert_gemm"}``; fields that cannot be read are left out."""
    info: dict[str, str | int] = {"cpus": os.cpu_count() or 0,
                                  "python": platform.python_version()}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    fields = {"model name": "cpu", "cpu family": "cpu_family", "model": "cpu_model"}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        name = fields.pop(key.strip(), None)
        if name:
            info[name] = value.strip()
    cache = Path("/sys/devices/system/cpu/cpu0/cache")
    for index in sorted(cache.glob("index*")):
        try:
            if (index / "level").read_text().strip() == "3":
                info["l3_cache"] = (index / "size").read_text().strip()
        except OSError:
            pass
    try:  # which expert GEMM this run used (services/core/cpu_gemm.py); A/B via the env switch
        from services.core import cpu_gemm

        info["expert_gemm"] = "packed" if cpu_gemm.ACTIVE else f"torch ({cpu_gemm.REASON})"
    except ImportError:
        pass
    if "cpu" not in info:
        info["cpu"] = platform.processor() or platform.machine()
    try:
        import torch

        info["torch"] = torch.__version__
    except ImportError:
        pass
    return info


def one_line(info: dict[str, str | int]) -> str:
    return (f"machine: {info.get('cpu')} (family {info.get('cpu_family', '?')} model "
            f"{info.get('cpu_model', '?')}), {info.get('cpus')} CPUs, L3 "
            f"{info.get('l3_cache', '?')}, torch {info.get('torch', '?')}, expert GEMM "
            f"{info.get('expert_gemm', '?')}")
