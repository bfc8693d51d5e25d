"""Ingest benchmark: DCMTK storescu sends the same files to DCMTK storescp and to the node.

Prints images/s and MB/s for both and the ratio node / storescp, with 1 and 4 concurrent associations,
for small instances (pydicom's CT_small, re-UIDed) and 512x512 CT slices (the phantom), plus the node's
peak RSS. The node runs as `dicom-ai-node serve` with no rules, so only receiving is measured; it fsyncs
every instance before acknowledging it, which storescp does not do (the ratio shows that price).

    .venv/bin/python benchmarks/ingest.py [--small 400] [--large 120]
"""
from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pydicom
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from dicom_ai_node.phantom import make_chest_phantom  # noqa: E402

ENV = {**os.environ, "TCP_NODELAY": "1"}


def free_ports(count: int) -> list[int]:
    """Distinct free ports: all held open while picking, so the OS cannot hand one out twice."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in sockets]
    finally:
        for s in sockets:
            s.close()


def wait_port(port: int, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listens on {port}")


def small_files(folder: Path, count: int) -> list[Path]:
    source = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    series = generate_uid()
    paths = []
    for i in range(count):
        source.SeriesInstanceUID = series
        source.SOPInstanceUID = generate_uid()
        source.file_meta.MediaStorageSOPInstanceUID = source.SOPInstanceUID
        path = folder / f"small{i:05d}.dcm"
        source.save_as(path)
        paths.append(path)
    return paths


def large_files(folder: Path, count: int) -> list[Path]:
    return make_chest_phantom(slices=count, size=512, pixel_spacing_mm=0.75, slice_thickness_mm=2.5,
                              uid_seed=f"bench-{time.time()}").write(folder)


def send(port: int, ae_title: str, files: list[Path], parallel: int) -> float:
    """Seconds for `parallel` storescu processes to send `files` (split evenly) to the port."""
    chunks = [files[i::parallel] for i in range(parallel)]
    start = time.perf_counter()
    procs = [subprocess.Popen(["storescu", "-aet", "BENCH", "-aec", ae_title, "127.0.0.1", str(port), *map(str, c)],
                              env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for c in chunks]
    for p in procs:
        _, err = p.communicate()
        if p.returncode != 0:
            raise RuntimeError(f"storescu failed: {err.decode()[-500:]}")
    return time.perf_counter() - start


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--small", type=int, default=400, help="number of CT_small instances")
    parser.add_argument("--large", type=int, default=120, help="number of 512x512 slices")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ingest-bench-"))
    try:
        (work / "small").mkdir()
        datasets = {"CT_small": small_files(work / "small", args.small),
                    "512x512 CT": large_files(work / "large", args.large)}
        rows = []
        for label, files in datasets.items():
            megabytes = sum(p.stat().st_size for p in files) / 1e6
            for parallel in (1, 4):
                ref_dir, node_dir = work / "storescp", work / "node"
                shutil.rmtree(ref_dir, ignore_errors=True)
                shutil.rmtree(node_dir, ignore_errors=True)
                ref_dir.mkdir()
                ref_port, node_port = free_ports(2)
                reference = subprocess.Popen(["storescp", "-aet", "REF", "-od", str(ref_dir), "--fork", str(ref_port)],
                                             env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                config = work / "node.yaml"
                config.write_text(f"node: {{port: {node_port}, bind_address: 127.0.0.1, data_dir: {node_dir}, "
                                  f"min_free_disk_mb: 1, ae_title: NODE}}\nrules: []\n")
                node = subprocess.Popen([sys.executable, "-m", "dicom_ai_node.cli", "serve", "--config", str(config)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                try:
                    wait_port(ref_port)
                    wait_port(node_port)
                    ref_s = send(ref_port, "REF", files, parallel)
                    node_s = send(node_port, "NODE", files, parallel)
                    rss = peak_rss_mb(node.pid)
                finally:
                    for p in (reference, node):
                        p.terminate()
                        p.wait(timeout=30)
                n = len(files)
                rows.append((label, parallel, n / ref_s, n / node_s, megabytes / ref_s, megabytes / node_s, rss))
        print(f"{'data':<11} {'assoc':>5} {'storescp img/s':>15} {'node img/s':>11} {'ratio':>6} "
              f"{'storescp MB/s':>14} {'node MB/s':>10} {'node peak RSS MB':>17}")
        for label, parallel, ref_ips, node_ips, ref_mbs, node_mbs, rss in rows:
            print(f"{label:<11} {parallel:>5} {ref_ips:>15.1f} {node_ips:>11.1f} {node_ips / ref_ips:>6.2f} "
                  f"{ref_mbs:>14.1f} {node_mbs:>10.1f} {rss:>17.0f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
