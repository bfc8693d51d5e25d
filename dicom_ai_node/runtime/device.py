"""Device selection, mixed precision and the memory guard.

The same code runs on CPU and GPU: AMP is a no-op context on CPU unless asked for (bfloat16), and the
memory guard reads GPU memory from CUDA and host memory from /proc/meminfo. A job that does not fit waits
in the queue (DeviceBusy) rather than crashing the worker with an out-of-memory error.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Iterator

log = logging.getLogger("dicom_ai_node.runtime")


class DeviceBusy(RuntimeError):
    """The device has not enough free memory for this job now; the job is queued again, not failed."""


def select_device(preference: str, index: int = 0) -> str:
    """'cuda:<index mod GPUs>' when asked for (or 'auto') and CUDA is usable, else 'cpu'."""
    if preference == "cpu":
        return "cpu"
    try:
        import torch
    except ImportError:
        return "cpu"
    if torch.cuda.is_available():
        return f"cuda:{index % torch.cuda.device_count()}"
    if preference == "cuda":
        log.warning("workers.device is cuda but no CUDA device is usable: running on cpu")
    return "cpu"


def gpu_count() -> int:
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def amp_dtype(device: str, cpu_amp: bool = False):
    """float16 on CUDA (tensor cores), bfloat16 on CPU only when asked for (it is slower on CPUs without
    AMX/AVX512-BF16), None for full precision."""
    import torch

    if device.startswith("cuda"):
        return torch.float16
    return torch.bfloat16 if cpu_amp else None


@contextlib.contextmanager
def inference_context(device: str, amp: bool = True, cpu_amp: bool = False) -> Iterator[None]:
    """torch.inference_mode plus autocast where AMP applies on this device."""
    import torch

    dtype = amp_dtype(device, cpu_amp) if amp else None
    with torch.inference_mode():
        if dtype is None:
            yield
        else:
            with torch.autocast(device_type=device.split(":")[0], dtype=dtype):
                yield


def host_available_mb() -> float:
    """MemAvailable of /proc/meminfo: what the kernel can give without swapping."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("inf")


def device_free_mb(device: str) -> float:
    """Free memory on `device` that a job may use: CUDA free memory plus what this process's caching
    allocator holds unused; host MemAvailable for cpu."""
    if not device.startswith("cuda"):
        return host_available_mb()
    import torch

    index = torch.device(device).index or 0
    free, _total = torch.cuda.mem_get_info(index)
    cached_unused = torch.cuda.memory_reserved(index) - torch.cuda.memory_allocated(index)
    return (free + cached_unused) / 2**20


def admit(device: str, needed_mb: float, limit_mb: float | None = None) -> None:
    """Raise DeviceBusy when `needed_mb` does not fit in the device's free memory (and `limit_mb`, the
    node's own cap for the device, if set). 0 means the pipeline declared no need: always admitted."""
    if needed_mb <= 0:
        return
    free = device_free_mb(device)
    if limit_mb is not None:
        free = min(free, limit_mb)
    if needed_mb > free:
        raise DeviceBusy(f"waiting for memory: needs {needed_mb:.0f} MB on {device}, {free:.0f} MB free")


@contextlib.contextmanager
def out_of_memory_as_busy(device: str) -> Iterator[None]:
    """A CUDA out-of-memory error during a job (another process took the memory after admission) frees
    the cache and becomes DeviceBusy, so the job is retried later instead of failing."""
    import torch

    try:
        yield
    except torch.OutOfMemoryError as exc:
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
        raise DeviceBusy(f"out of memory on {device}: {str(exc).splitlines()[0]}") from exc
