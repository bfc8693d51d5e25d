"""runtime/allocator.py: a worker that keeps freed memory does not fault a repeated large allocation in
again (page faults counted by the kernel, not timed)."""
from __future__ import annotations

import subprocess
import sys

import pytest

PROBE = """
import resource, sys
import numpy as np
from dicom_ai_node.runtime.allocator import keep_freed_memory
if sys.argv[1] == "tuned":
    assert keep_freed_memory()
def job():
    # A pipeline's volume-sized temporaries, several alive at once: 4 x 30 MiB, 15 MiB, 7.5 MiB
    a = np.ones((120, 256, 256), dtype=np.float32)
    b, c, d = a * 2.0, a + 1.0, a - 1.0
    e = (a > 0).astype(np.int16)
    f = a > 0.5
    return float(b[0, 0, 0] + c[0, 0, 0] + d[0, 0, 0] + e[0, 0, 0] + f[0, 0, 0])
job()  # warm
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    job()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults(mode: str) -> int:
    run = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    return int(run.stdout.strip())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_kept_memory_is_not_faulted_in_again() -> None:
    default, tuned = faults("default"), faults("tuned")
    # glibc's defaults give part of each job's ~140 MiB back and fault it in again (~16,000 faults for the
    # 5 jobs on glibc 2.36); kept, almost nothing is faulted in.
    assert default > 5_000
    assert tuned < default / 10


FREEZE_PROBE = """
import gc
from dicom_ai_node.runtime.allocator import freeze_long_lived_objects

class Node:
    def __init__(self):
        self.me = self  # a reference cycle: only the collector frees it

kept = [Node() for _ in range(50_000)]
freeze_long_lived_objects()
frozen = gc.get_freeze_count()
garbage = [Node() for _ in range(1000)]
del garbage
print(frozen, gc.collect(), len(gc.get_objects(generation=2)))
"""


def test_frozen_objects_leave_later_collections_and_new_cycles_are_still_freed() -> None:
    run = subprocess.run([sys.executable, "-c", FREEZE_PROBE], capture_output=True, text=True, check=True)
    frozen, collected, in_gen2 = (int(v) for v in run.stdout.split())
    assert frozen >= 50_000  # the long-lived objects are out of the collector's walks
    assert collected >= 1000  # cycles made afterwards are still found and freed
    assert in_gen2 < 10_000  # a full collection walks what came after, not the 50,000 kept
