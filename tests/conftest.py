"""Real peers for the tests: the node itself, Orthanc (the PACS) and DCMTK tools, all on 127.0.0.1."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest

from dicom_ai_node.config import NodeConfig, parse_config
from dicom_ai_node.service import NodeService

REPO = Path(__file__).resolve().parent.parent
ORTHANC_BIN = shutil.which("Orthanc") or ("/usr/sbin/Orthanc" if Path("/usr/sbin/Orthanc").exists() else None)
# DCMTK (and Orthanc's DICOM side, which is DCMTK) set TCP_NODELAY when this variable is set;
# without it every message waits ~40 ms for delayed ACKs on loopback.
PEER_ENV = {**os.environ, "TCP_NODELAY": "1"}


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """`count` distinct free ports: all are held open while picking, so the OS cannot hand one out twice."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in sockets]
    finally:
        for s in sockets:
            s.close()


def require_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is not installed (CI installs dcmtk, orthanc and dicom3tools)")
        pytest.skip(f"{name} is not installed")
    return path


def echoscu(port: int, calling_ae: str, called_ae: str = "DICOM_AI_NODE") -> subprocess.CompletedProcess:
    """DCMTK's echoscu against a node. A rejection is checked with it, not with pynetdicom's requestor: that
    reports an A-ASSOCIATE-RJ as an abort when its user thread is slow to look (it checks whether the socket
    is still connected after the reactor thread may have read the reject and closed it)."""
    require_tool("echoscu")
    return subprocess.run(["echoscu", "-aet", calling_ae, "-aec", called_ae, "127.0.0.1", str(port)],
                          env=PEER_ENV, capture_output=True, text=True, timeout=60)


def journal_died(journal: Any) -> None:
    """Release an ingest journal's owner lock as the kernel does when its process dies (the test's process
    lives on, and opens the journal again as the next process would)."""
    os.close(journal._owner_fd)  # noqa: SLF001
    journal._owner_fd = None  # noqa: SLF001


def node_config(data_dir: Path, port: int, extra_yaml: str = "", node_options: str = "") -> NodeConfig:
    return parse_config(node_yaml(data_dir, port, extra_yaml, node_options), "test node.yaml")


def node_yaml(data_dir: Path, port: int, extra_yaml: str = "", node_options: str = "") -> str:
    """A test node's configuration; node_options: more `key: value` lines of its `node:` block."""
    options = "".join(f"  {line.strip()}\n" for line in node_options.splitlines() if line.strip())
    return f"""
node:
  ae_title: DICOM_AI_NODE
  port: {port}
  bind_address: 127.0.0.1
  data_dir: {data_dir}
  min_free_disk_mb: 1
{options}{"" if "completion:" in extra_yaml else "completion: {quiet_period_s: 1.0}"}
{"" if "dispatch:" in extra_yaml else "dispatch: {max_attempts: 3, initial_delay_s: 0.5}"}
{extra_yaml}
"""


@pytest.fixture
def start_node(tmp_path: Path) -> Iterator[Any]:
    """Start a node (real SCP, workers, dispatcher) with a config; stops it at teardown."""
    started: list[NodeService] = []

    def start(extra_yaml: str = "", data_dir: Path | None = None, node_options: str = "") -> NodeService:
        config = node_config(data_dir or tmp_path / "node", free_port(), extra_yaml, node_options)
        service = NodeService(config)
        # The same configuration as a file, for tests that run the CLI against this node.
        service.config_path = tmp_path / f"node-{len(started)}.yaml"
        service.config_path.write_text(node_yaml(data_dir or tmp_path / "node", config.node.port, extra_yaml,
                                                 node_options))
        service.start()
        started.append(service)
        return service

    yield start
    for service in started:
        service.stop()


@dataclass
class Orthanc:
    """A real Orthanc server, configured in a temp dir, with a tiny REST client. stop()/start() take the
    PACS down and bring it back with the same storage, as an outage would."""

    http_port: int
    dicom_port: int
    aet: str
    config_path: Path
    log_path: Path
    process: subprocess.Popen | None = None

    def start(self, timeout: float = 60) -> None:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen([ORTHANC_BIN, str(self.config_path)], stdout=log,
                                            stderr=subprocess.STDOUT, env=PEER_ENV)
        deadline = time.time() + timeout
        while True:
            try:
                self.get("/system")
                return
            except (urllib.error.URLError, ConnectionError, OSError):
                if self.process.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"Orthanc did not start: {self.log_path.read_text()[-2000:]}")
                time.sleep(0.2)

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.process = None

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.http_port}{path}"

    def request(self, method: str, path: str, body: bytes | dict | str | None = None, timeout: float = 120) -> Any:
        data = json.dumps(body).encode() if isinstance(body, (dict, list)) else (
            body.encode() if isinstance(body, str) else body)
        req = urllib.request.Request(self.url(path), data=data, method=method)
        with urllib.request.urlopen(req, timeout=timeout) as response:
            payload = response.read()
        ctype = response.headers.get("Content-Type", "")
        return json.loads(payload) if "json" in ctype else payload

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def upload(self, path: Path) -> dict:
        return self.request("POST", "/instances", path.read_bytes())

    def add_modality(self, name: str, aet: str, port: int, host: str = "127.0.0.1") -> None:
        self.request("PUT", f"/modalities/{name}", {"AET": aet, "Host": host, "Port": port})

    def instances_of_study(self, study_uid: str) -> list[dict]:
        found = self.request("POST", "/tools/find", {"Level": "Instance", "Query": {"StudyInstanceUID": study_uid},
                                                     "Expand": True})
        return found


def start_orthanc(folder: Path, name: str, **settings: Any) -> Orthanc:
    """Start a real Orthanc with its config in `folder`; `settings` add to or replace the test defaults."""
    if ORTHANC_BIN is None:
        require_tool("Orthanc")
    folder.mkdir(parents=True, exist_ok=True)
    http_port, dicom_port = free_ports(2)
    config = {
        "Name": name,
        "StorageDirectory": str(folder / "storage"),
        "IndexDirectory": str(folder / "index"),
        "HttpPort": http_port,
        "DicomPort": dicom_port,
        "DicomAet": "ORTHANC",
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "Plugins": [],
        "DicomAlwaysAllowStore": True,
        "DicomAlwaysAllowEcho": True,
        "DicomCheckCalledAet": False,
        "OverwriteInstances": False,
        "StableAge": 1,
        "DicomScuTimeout": 30,
        "HttpTimeout": 120,
        "UnknownSopClassAccepted": True,
        **settings,
    }
    (folder / "orthanc.json").write_text(json.dumps(config))
    server = Orthanc(http_port, dicom_port, "ORTHANC", folder / "orthanc.json", folder / "orthanc.log")
    server.start()
    return server


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[Orthanc]:
    server = start_orthanc(tmp_path / "orthanc", "test-pacs")
    yield server
    server.stop()


def wait_for(predicate, timeout: float, interval: float = 0.25, what: str = "condition") -> Any:
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
