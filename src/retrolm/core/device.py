"""Where models run: the default device, the autocast context that goes with it, and the CPUs a process has."""

from __future__ import annotations

import contextlib
import os

import torch

from retrolm.core.errors import RetrolmError


def peak_memory_gib(device: torch.device) -> float | None:
    """This process's peak memory so far: allocated on a GPU, resident (RSS) on a CPU (None where unknown)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        import resource
    except ImportError:  # not on Windows
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def default_device(device: str | torch.device | None = None) -> torch.device:
    """``device`` if given (checked: a device torch knows, CUDA only where there is one), else CUDA when available,
    else the CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RetrolmError(f"device={device}: not a device ({first})") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RetrolmError(f"device={device}: CUDA is not available on this machine (use device=cpu)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise RetrolmError(f"device={device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return dev


def autocast(device: torch.device, enabled: bool = True) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA (when ``enabled``), a no-op elsewhere: CPU matmuls stay in fp32."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def usable_cpus() -> int:
    """CPUs this process may run on (the container's or ``taskset``'s share, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        return os.cpu_count() or 1
