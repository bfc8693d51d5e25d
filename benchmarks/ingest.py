"""Ingest benchmark: DCMTK storescu sends the same files to DCMTK storescp and to the node.

For small instances (pydicom's CT_small, re-UIDed) and 512x512 CT slices (the phantom, re-UIDed), with 1
and 4 concurrent associations (storescu processes), it prints images/s and MB/s of
- storescp: plain `storescp --fork`, which fsyncs nothing (the issue's reference);
- storescp+fsync: the same with an LD_PRELOAD shim (built here with cc, skipped without one) that
  fdatasyncs every file storescp writes and fsyncs its folder before storescp answers: a reference with
  the node's promise (an acknowledged instance is on disk);
- node: `dicom-ai-node serve` with no rules, so only receiving is measured (receive_processes: 1, the
  default), and the same with `receive_processes: 2`;
and each one's ratio to storescp; with --node-tree DIR, also the node of another checkout (e.g. a worktree
of an earlier commit, `git worktree add /tmp/before HEAD~3`), so that a change is measured against what it
changed in the same run. Each figure is the median of --repeat runs, the servers taking turns.
Each server first receives an untimed warm-up set (as many instances of the same kind, other UIDs): the
node is measured as it runs in a hospital, with its ingest journal's segments allocated, not as on its
first start on an empty disk (--cold: no warm-up). The node's peak RSS (with its child processes) is
reported per row with the CPU time its processes spent per instance received (user + system, median), and
with --big-gb the node receives one study of that size (512x512 slices, 4 associations) while its RSS is
sampled: idle, peak, peak above idle.

    .venv/bin/python benchmarks/ingest.py [--small 1000] [--large 300] [--repeat 3] [--big-gb 2] [--cold]
                                          [--node-tree DIR]
"""
from __future__ import annotations

import argparse
import math
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pydicom
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
from conftest import PEER_ENV as ENV, free_ports  # noqa: E402  (DCMTK with TCP_NODELAY; distinct free ports)
from dicom_ai_node.phantom import make_chest_phantom  # noqa: E402

SHIM = r"""
/* fdatasync every regular file the program wrote, then fsync its folder, when the file is closed */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <libgen.h>
#include <limits.h>
#include <stdio.h>
#include <sys/stat.h>
#include <unistd.h>

static void make_durable(int fd) {
    struct stat st;
    int mode = fcntl(fd, F_GETFL);
    if (mode < 0 || (mode & O_ACCMODE) == O_RDONLY || fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) return;
    fdatasync(fd);
    char link[64], path[PATH_MAX];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, path, sizeof path - 1);
    if (n <= 0) return;
    path[n] = 0;
    int dir = open(dirname(path), O_RDONLY | O_DIRECTORY);
    if (dir >= 0) { fsync(dir); close(dir); }
}

int fclose(FILE *stream) {
    static int (*real_fclose)(FILE *) = NULL;
    if (!real_fclose) real_fclose = (int (*)(FILE *))dlsym(RTLD_NEXT, "fclose");
    if (stream) { fflush(stream); make_durable(fileno(stream)); }
    return real_fclose(stream);
}
"""


def wait_port(port: int, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listens on {port}")


def replicate(sources: list[Path], folder: Path, count: int) -> list[Path]:
    """`count` instances of one new series, cycling through `sources`, each with its own SOP Instance UID."""
    folder.mkdir(parents=True, exist_ok=True)
    datasets = [pydicom.dcmread(p) for p in sources]
    series = generate_uid()
    paths = []
    for i in range(count):
        ds = datasets[i % len(datasets)]
        ds.SeriesInstanceUID = series
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = i + 1
        path = folder / f"{i:06d}.dcm"
        ds.save_as(path)
        paths.append(path)
    return paths


def small_files(folder: Path, count: int) -> list[Path]:
    return replicate([Path(get_testdata_file("CT_small.dcm"))], folder, count)


def large_files(folder: Path, count: int) -> list[Path]:
    base = make_chest_phantom(slices=min(count, 40), size=512, pixel_spacing_mm=0.75, slice_thickness_mm=2.5,
                              uid_seed=f"bench-{time.time()}").write(folder / "base")
    return replicate(base, folder / "series", count)


def build_shim(work: Path) -> Path | None:
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None
    source, library = work / "fsync_on_close.c", work / "fsync_on_close.so"
    source.write_text(SHIM)
    result = subprocess.run([compiler, "-shared", "-fPIC", "-O2", "-o", str(library), str(source), "-ldl"],
                            capture_output=True, text=True)
    return library if result.returncode == 0 else None


def send(port: int, ae_title: str, files: list[Path], parallel: int) -> float:
    """Seconds for `parallel` storescu processes to send `files` (split evenly) to the port."""
    chunks = [files[i::parallel] for i in range(parallel)]
    start = time.perf_counter()
    procs = [subprocess.Popen(["storescu", "-aet", "BENCH", "-aec", ae_title, "127.0.0.1", str(port), *map(str, c)],
                              env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for c in chunks]
    failures = []
    for p in procs:
        _, err = p.communicate()
        if p.returncode != 0:
            failures.append(err.decode()[-500:])
    if failures:
        raise RuntimeError(f"storescu failed: {failures[0]}")
    return time.perf_counter() - start


def rss_mb(pid: int, field: str = "VmRSS:") -> float:
    """A process's memory with all its descendants' (the receive processes, the pipeline worker)."""
    total = 0.0
    for process in [pid, *descendants(pid)]:
        try:
            for line in Path(f"/proc/{process}/status").read_text().splitlines():
                if line.startswith(field):
                    total += int(line.split()[1]) / 1024
        except FileNotFoundError:
            continue
    return total


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its live descendants (the receive processes)."""
    total = 0
    for process in [pid, *descendants(pid)]:
        try:
            fields = Path(f"/proc/{process}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except FileNotFoundError:
            continue
    return total / os.sysconf("SC_CLK_TCK")


def descendants(pid: int) -> list[int]:
    children: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children += [int(c) for c in (task / "children").read_text().split()]
        except FileNotFoundError:
            continue
    return children + [d for c in children for d in descendants(c)]


def settle(pid: int, quiet_s: float = 0.02, every_s: float = 0.5, timeout_s: float = 120.0) -> None:
    """Wait until the process tree spends under `quiet_s` of CPU per `every_s` (start-up done)."""
    deadline = time.monotonic() + timeout_s
    before = cpu_seconds(pid)
    while time.monotonic() < deadline:
        time.sleep(every_s)
        now = cpu_seconds(pid)
        if now - before < quiet_s:
            return
        before = now


class Storescp:
    def __init__(self, work: Path, shim: Path | None = None) -> None:
        self.out = work / "storescp"
        shutil.rmtree(self.out, ignore_errors=True)
        self.out.mkdir(parents=True)
        self.port = free_ports(1)[0]
        env = {**ENV, "LD_PRELOAD": str(shim)} if shim else ENV
        self.process = subprocess.Popen(["storescp", "-aet", "REF", "-od", str(self.out), "--fork", str(self.port)],
                                        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)
        shutil.rmtree(self.out, ignore_errors=True)


class Node:
    def __init__(self, work: Path, receive_processes: int = 1, tree: Path = REPO) -> None:
        self.data = work / "node"
        shutil.rmtree(self.data, ignore_errors=True)
        self.port = free_ports(1)[0]
        config = work / "node.yaml"
        config.write_text(f"node: {{port: {self.port}, bind_address: 127.0.0.1, data_dir: {self.data}, "
                          f"min_free_disk_mb: 1, ae_title: NODE, receive_processes: {receive_processes}}}\nrules: []\n")
        # `python -m` imports the package from its working directory first: the node of `tree`
        self.process = subprocess.Popen([sys.executable, "-m", "dicom_ai_node.cli", "serve", "--config", str(config)],
                                        cwd=tree, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port)
        settle(self.process.pid)  # the pipeline worker starts with the node: wait until it is ready and idle
        self.idle_rss = rss_mb(self.process.pid)

    def peak_rss(self) -> float:
        return rss_mb(self.process.pid, "VmHWM:")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=60)
        shutil.rmtree(self.data, ignore_errors=True)


SERVERS = ("storescp", "storescp+fsync", "node", "node, 2 receive processes")
OTHER_TREE = "node @ --node-tree"


def measure(work: Path, files: list[Path], warm_up: list[Path], parallel: int, repeat: int,
            shim: Path | None, other_tree: Path | None = None) -> dict[str, tuple[float, float, float]]:
    """Median seconds, peak RSS (MB) and median CPU ms per instance (the nodes' only) of each server."""
    servers = SERVERS + ((OTHER_TREE,) if other_tree is not None else ())
    seconds: dict[str, list[float]] = {name: [] for name in servers}
    cpu_ms: dict[str, list[float]] = {name: [] for name in servers}
    peak: dict[str, float] = {name: float("nan") for name in servers}
    for _ in range(repeat):
        for name in servers:
            if name == "storescp+fsync" and shim is None:
                continue
            if name.startswith("node"):
                tree = other_tree if name == OTHER_TREE and other_tree is not None else REPO
                server: Node | Storescp = Node(work, 2 if "2 receive" in name else 1, tree)
                ae_title = "NODE"
            else:
                server, ae_title = Storescp(work, shim if name == "storescp+fsync" else None), "REF"
            try:
                if warm_up:
                    send(server.port, ae_title, warm_up, parallel)
                    time.sleep(2.0)  # the node's journal checkpoints when the sender pauses
                before = cpu_seconds(server.process.pid) if isinstance(server, Node) else 0.0
                seconds[name].append(send(server.port, ae_title, files, parallel))
                if isinstance(server, Node):
                    cpu_ms[name].append(1000 * (cpu_seconds(server.process.pid) - before) / len(files))
                    peak[name] = server.peak_rss() if math.isnan(peak[name]) else max(peak[name], server.peak_rss())
            finally:
                server.stop()
    return {name: (statistics.median(s), peak[name], statistics.median(cpu_ms[name]) if cpu_ms[name] else float("nan"))
            for name, s in seconds.items() if s}


def big_study(work: Path, gigabytes: float, parallel: int = 4) -> tuple[int, float, float, float, float, float]:
    """(instances, MB, seconds, idle RSS, peak RSS, highest sampled RSS) for one study of that size."""
    count = max(1, int(gigabytes * 1e9 / (512 * 512 * 2 + 4000)))
    files = large_files(work / "big", count)
    megabytes = sum(p.stat().st_size for p in files) / 1e6
    node = Node(work)
    samples: list[float] = []
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.2):
            samples.append(rss_mb(node.process.pid))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        seconds = send(node.port, "NODE", files, parallel)
        done.set()
        sampler.join()
        return count, megabytes, seconds, node.idle_rss, node.peak_rss(), max(samples, default=float("nan"))
    finally:
        done.set()
        node.stop()
        shutil.rmtree(work / "big", ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", type=int, default=1000, help="number of CT_small instances")
    parser.add_argument("--large", type=int, default=300, help="number of 512x512 slices")
    parser.add_argument("--repeat", type=int, default=3, help="runs per figure (the median is shown)")
    parser.add_argument("--big-gb", type=float, default=0.0, help="also receive one study of this many GB "
                        "(512x512 slices, 4 associations) and report the node's RSS; 0: skip")
    parser.add_argument("--cold", action="store_true", help="no warm-up set: each server starts on an empty disk")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a new temporary one)")
    parser.add_argument("--node-tree", type=Path, default=None,
                        help="also measure the node of this checkout (an earlier commit's worktree)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ingest-bench-", dir=args.work))
    try:
        shim = build_shim(work)
        datasets = {"CT_small": (small_files(work / "small", args.small),
                                 [] if args.cold else small_files(work / "small-warm-up", args.small)),
                    "512x512 CT": (large_files(work / "large", args.large),
                                   [] if args.cold else large_files(work / "large-warm-up", args.large))}
        rows = []
        for label, (files, warm_up) in datasets.items():
            megabytes = sum(p.stat().st_size for p in files) / 1e6
            for parallel in (1, 4):
                result = measure(work, files, warm_up, parallel, args.repeat, shim, args.node_tree)
                rows.append((label, parallel, len(files), megabytes, result))
        print(f"{'data':<11} {'assoc':>5}  {'server':<27} {'img/s':>7} {'MB/s':>7} {'ratio':>6} {'peak RSS MB':>11} "
              f"{'CPU ms/img':>10}")
        for label, parallel, n, megabytes, result in rows:
            reference = result["storescp"][0]
            for name, (seconds, peak, cpu) in result.items():
                rss = f"{'':>11}" if math.isnan(peak) else f"{peak:11.0f}"
                cpu_text = f"{'':>10}" if math.isnan(cpu) else f"{cpu:10.2f}"
                print(f"{label:<11} {parallel:>5}  {name:<27} {n / seconds:7.1f} {megabytes / seconds:7.1f} "
                      f"{reference / seconds:6.2f} {rss} {cpu_text}")
        if args.node_tree is not None:
            print(f"({OTHER_TREE}: {args.node_tree})")
        if shim is None:
            print("(no C compiler: storescp+fsync not measured)")
        if args.big_gb > 0:
            count, megabytes, seconds, idle, peak, sampled = big_study(work, args.big_gb)
            print(f"\nbig study: {count} slices, {megabytes / 1e3:.2f} GB in {seconds:.1f} s "
                  f"({count / seconds:.1f} img/s, {megabytes / seconds:.1f} MB/s, 4 associations); node RSS idle "
                  f"{idle:.0f} MB, peak {peak:.0f} MB (highest sample {sampled:.0f} MB), peak above idle "
                  f"{peak - idle:.0f} MB")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
