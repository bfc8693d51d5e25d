"""The memory of worker processes: the allocator keeps freed memory for the next job, and the garbage
collector leaves the long-lived objects alone.

Allocator: a pipeline allocates and frees the same large arrays on every call (SimpleITK filter outputs, torch
tensors, numpy temporaries of a volume). glibc serves each allocation above its mmap threshold with a fresh
mmap and unmaps it on free, and trims the heap's free top back to the kernel, so every call faults its
working set in again page by page: ct_lung on a 120 x 256 x 256 CT took 48,000 page faults and ~0.3 s of
system CPU per call. With allocations up to 32 MiB (glibc's largest mmap threshold) taken from the heap
and up to 1 GiB of free heap kept, a warm worker faults almost nothing: ct_lung 0 faults and ~5 % faster,
ct_nodule_unet ~10 % faster (benchmarks/RESULTS.md). The cost is that a worker keeps its peak heap, as
PyTorch's caching allocator keeps its peak on a GPU; memory above 1 GiB free is still returned.

Garbage collector: a warm worker holds ~370,000 objects that live as long as it does (modules, the loaded
pipeline, highdicom's and pydicom's tables), and a job allocates enough for Python to run a full collection
every few jobs, which walks them all: ~0.1 s in the middle of a job's writing. Once a pipeline has run its
first job, they are collected once and frozen (gc.freeze): later full collections walk only what came
after. Frozen objects are still freed when nothing refers to them; only a reference cycle among them would
stay, and what is frozen is what stays loaded anyway.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import gc
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


def freeze_long_lived_objects() -> None:
    """Collect, then keep every object alive now out of later collections (see above)."""
    gc.collect()
    gc.freeze()
