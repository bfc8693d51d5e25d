"""Receivers in several processes behind one listening socket (`node.receive_processes` > 1).

One Python process receives with one GIL: with several associations at once it spends a core and no more
(benchmarks/RESULTS.md, Ingest). The pool's process listens and hands each accepted connection (its file
descriptor, over a Unix socket) to the receive process with the fewest associations; each of those is a
whole `Receiver` (UL, checks, its own ingest journal `journal/<n>` and placer) that records into the same
job store. The pool counts the associations of all processes, so `max_associations` holds for the node.

A receive process that dies is started again at once; its journal replays what it acknowledged and had
not placed. The receive processes stop when the pool closes its end of their socket, also when the node
itself is killed, so none outlives it.
"""
from __future__ import annotations

import json
import logging
import multiprocessing
import signal
import socket
import sys
import threading
from dataclasses import dataclass
from typing import Any

from dicom_ai_node.audit import AuditLog
from dicom_ai_node.config import NodeConfig
from dicom_ai_node.jobs.store import JobStore
from dicom_ai_node.receive.journal import recover_other_journals
from dicom_ai_node.receive.scp import Receiver, announce_listening
from dicom_ai_node.receive.ul import Listener

log = logging.getLogger("dicom_ai_node.receive")

START_TIMEOUT_S = 120.0  # a receive process imports pydicom and pynetdicom, and replays its journal


@dataclass
class _Process:
    index: int
    process: Any  # multiprocessing.Process
    channel: socket.socket  # our end of the socket pair: connections go out, b"closed" comes back for each
    active: int = 0  # connections handed over and not closed yet

    def count_closed(self) -> None:
        """Take the process's b"closed" messages that have arrived (without waiting)."""
        while True:
            try:
                message = self.channel.recv(16, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return  # the process is gone; _replace_dead handles it
            if message != b"closed":
                return
            self.active = max(0, self.active - 1)


class ReceiverPool:
    """The same interface as Receiver for the service: start(), stop(), port."""

    def __init__(self, config: NodeConfig, store: JobStore, processes: int) -> None:
        self.config = config
        self.store = store
        self.count = processes
        self._context = multiprocessing.get_context("spawn")  # no fork of a process that runs threads
        self._processes: list[_Process] = []
        self._listener: Listener | None = None
        self._lock = threading.Lock()

    @property
    def port(self) -> int:
        assert self._listener is not None
        return self._listener.port

    @property
    def journal_names(self) -> set[str]:
        """The journals of its receive processes (each replays its own when it starts again)."""
        return {str(i) for i in range(self.count)}

    def start(self) -> None:
        config = self.config
        config.spool_dir.mkdir(parents=True, exist_ok=True)
        replayed = recover_other_journals(config.journal_dir, config.spool_dir, self.store, keep=self.journal_names)
        if replayed:
            log.info("replayed %d instance(s) from the journals of former receive processes", replayed)
        self._processes = [self._spawn(i) for i in range(self.count)]
        self._listener = Listener(config.node.bind_address, config.node.port, self._take,
                                  every_turn=self._replace_dead)
        self._listener.start()
        announce_listening(config, self.port, f" ({self.count} receive processes)")

    def stop(self) -> None:
        if self._listener is not None:
            self._listener.stop()
        with self._lock:
            processes, self._processes = self._processes, []
        for child in processes:
            child.channel.close()  # its receiver stops: connections aborted, journal placed and closed
        for child in processes:
            child.process.join(timeout=90)
            if child.process.is_alive():
                log.error("receive process %d did not stop; killed (its journal replays at the next start)",
                          child.index)
                child.process.kill()
                child.process.join()

    def _spawn(self, index: int) -> _Process:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        process = self._context.Process(
            target=receive_process, name=f"dicom-receive-{index}", daemon=True,
            args=(self.config, str(index), theirs, logging.getLogger().getEffectiveLevel()),
        )
        process.start()
        theirs.close()
        ours.settimeout(START_TIMEOUT_S)
        try:
            ready = ours.recv(16)
        except TimeoutError:
            ready = b""
        if ready != b"ready":
            process.kill()
            raise RuntimeError(f"receive process {index} did not start (exit code {process.exitcode}); see its log")
        ours.settimeout(None)
        return _Process(index, process, ours)

    def _take(self, sock: socket.socket, address: tuple[Any, ...]) -> None:
        try:
            self._hand_over(sock, address)
        except OSError as exc:
            log.error("connection from %s dropped: no receive process took it (%s)", address[0], exc)
        finally:
            sock.close()  # the receive process has its own descriptor now

    def _hand_over(self, sock: socket.socket, address: tuple[Any, ...]) -> None:
        with self._lock:
            alive = [p for p in self._processes if p.process.is_alive()]
            if not alive:
                raise OSError("every receive process has stopped")
            for child in alive:
                child.count_closed()
            total = sum(p.active for p in alive)
            target = min(alive, key=lambda p: p.active)
            message = json.dumps({"address": [str(address[0]), int(address[1])],
                                  "over_limit": total >= self.config.node.max_associations}).encode()
            socket.send_fds(target.channel, [message], [sock.fileno()])
            target.active += 1

    def _replace_dead(self) -> None:
        with self._lock:
            dead = [p for p in self._processes if not p.process.is_alive()]
        for child in dead:
            log.error("receive process %d ended (exit code %s): starting it again", child.index,
                      child.process.exitcode)
            child.channel.close()
            try:
                replacement = self._spawn(child.index)
            except Exception:  # noqa: BLE001 - try again on the next pass; the others keep receiving
                log.exception("receive process %d could not be started again", child.index)
                continue
            with self._lock:
                self._processes = [replacement if p is child else p for p in self._processes]


def receive_process(config: NodeConfig, journal: str, channel: socket.socket, log_level: int) -> None:
    """A receive process: a Receiver without a listener, taking the connections the pool hands over."""
    from dicom_ai_node.cli import SWITCH_INTERVAL_S, setup_logging

    setup_logging(log_level)
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    # A stop signal to the whole process group (Ctrl-C, systemd's default KillMode) is the node's to act
    # on: it closes this process's channel, and this process then places, checkpoints and ends. Killed
    # alone it would leave its journal to be replayed.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    receiver = Receiver(config, JobStore(config.db_path), AuditLog(config.audit_path), journal=journal)
    receiver.start(listen=False)
    assert receiver.acceptor is not None

    def closed() -> None:
        try:
            channel.send(b"closed")
        except OSError:
            pass  # the pool is gone: this process stops too

    channel.sendall(b"ready")
    try:
        while True:
            try:
                message, fds, _, _ = socket.recv_fds(channel, 4096, 1)
            except OSError:
                break
            if not message:
                break  # the pool closed its end: the node stops, or died
            handed = json.loads(message)
            if not fds:
                continue
            sock = socket.socket(fileno=fds[0])
            receiver.acceptor.handle(sock, tuple(handed["address"]), over_limit=handed["over_limit"],
                                     on_close=closed)
    finally:
        receiver.stop()
