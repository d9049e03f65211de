"""Device strings checked against what this machine has: ``auto`` = CUDA, else MPS, else CPU."""
from __future__ import annotations

import re

import torch

from .errors import ConceptmonError

DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
DEVICE_CHOICES = "auto, cpu, cuda, cuda:N or mps"


class DeviceError(ConceptmonError):
    """A device that is not a valid name, or not present on this machine."""


def check_device_name(name: str, field: str = "device") -> str:
    """A syntactically valid device string, or one line naming the choices."""
    name = str(name).strip()
    if not DEVICE_PATTERN.match(name):
        raise DeviceError(f"{field}: expected {DEVICE_CHOICES}, got {name!r}")
    return name


def resolve_device(name: str, field: str = "device") -> torch.device:
    """The torch device for ``name``, refusing what this machine does not have."""
    name = check_device_name(name, field)
    mps = getattr(torch.backends, "mps", None)
    mps_ok = mps is not None and mps.is_available()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if mps_ok else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DeviceError(f"{field}: {name} requested but CUDA is not available here (use auto or cpu)")
        index = int(name.split(":")[1]) if ":" in name else 0
        count = torch.cuda.device_count()
        if index >= count:
            raise DeviceError(f"{field}: {name} requested but this machine has {count} CUDA device(s) "
                              f"(cuda:0..cuda:{count - 1})")
        return torch.device(name)
    if name == "mps" and not mps_ok:
        raise DeviceError(f"{field}: mps requested but Apple MPS is not available here (use auto or cpu)")
    return torch.device(name)


def available_bytes(device: torch.device) -> int:
    """Memory a run may plan with on ``device``: free GPU memory, or available host RAM."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 4 << 30


__all__ = ["DEVICE_CHOICES", "DeviceError", "available_bytes", "check_device_name", "resolve_device"]
