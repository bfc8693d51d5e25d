"""The worker's memory allocator: keep freed memory for the next job instead of giving it back at once.

A pipeline allocates and frees the same large arrays on every call (SimpleITK filter outputs, torch
tensors, numpy temporaries of a volume). glibc serves each allocation above its mmap threshold with a fresh
mmap and unmaps it on free, and trims the heap's free top back to the kernel, so every call faults its
working set in again page by page: ct_lung on a 120 x 256 x 256 CT took 48,000 page faults and ~0.3 s of
system CPU per call. With allocations up to 32 MiB (glibc's largest mmap threshold) taken from the heap
and up to 1 GiB of free heap kept, a warm worker faults almost nothing: ct_lung 0 faults and ~5 % faster,
ct_nodule_unet ~10 % faster (benchmarks/RESULTS.md). The cost is that a worker keeps its peak heap, as
PyTorch's caching allocator keeps its peak on a GPU; memory above 1 GiB free is still returned.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger("dicom_ai_node.runtime.allocator")

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3  # glibc malloc.h
MMAP_THRESHOLD_BYTES = 32 << 20  # glibc refuses more (HEAP_MAX_SIZE / 2 on 64-bit)
TRIM_THRESHOLD_BYTES = 1 << 30
TOP_PAD_BYTES = 64 << 20


def keep_freed_memory() -> bool:
    """Tune glibc's malloc of this process as above; False (and nothing changed) where it is not glibc."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    done = all(mallopt(option, value) == 1 for option, value in (
        (M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES), (M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES),
        (M_TOP_PAD, TOP_PAD_BYTES)))
    if not done:
        log.info("malloc tuning not applied (mallopt refused); jobs run with the allocator's defaults")
    return done
