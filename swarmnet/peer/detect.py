"""What a volunteer's machine offers, in one line for `swarmnet join` to print."""

from __future__ import annotations

import os


def describe_device(device: str) -> str:
    """`cuda:0 (NVIDIA H100, 79.2 GiB)` or `cpu (2 cores, 23.5 GiB RAM)`."""
    import torch

    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            return f"{device} (CUDA is not available on this machine)"
        props = torch.cuda.get_device_properties(torch.device(device))
        return f"{device} ({props.name}, {props.total_memory / 2**30:.1f} GiB)"
    if device == "mps":
        return "mps (Apple GPU)"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{device} ({cores} cores, {_ram_gib():.1f} GiB RAM)"


def _ram_gib() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        return float("nan")
