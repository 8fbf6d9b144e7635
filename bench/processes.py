"""Servers in subprocesses: ours (``python -m service``) and the Triton peer.

Ours binds port 0 and reports its ports in its JSON "listening" log event; we read them
from stderr. Used by the benchmark report and by the integration tests.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def peak_rss_mb(pid: int) -> float:
    """Peak resident set size (VmHWM) of a live process, in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def process_tree(pid: int) -> list[int]:
    """A process and all its descendants (the server's workers, the peer's helpers)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(children.get(current, []))
    return tree


def rss_mb(pid: int) -> float:
    """Current RSS of one process in MB (0 if it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def tree_rss_mb(pid: int) -> float:
    """Current RSS of a process and all its descendants, in MB."""
    return sum(rss_mb(p) for p in process_tree(pid))


def alive(pid: int) -> bool:
    """Running, and not a zombie waiting for a parent to reap it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # the state follows "(comm)"


_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of one process so far, all its threads (0 if gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICKS  # utime, stime


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of a process tree: the server's whole cost, workers included."""
    return sum(cpu_seconds(p) for p in process_tree(pid))


class ServerProcess:
    """``python -m service`` on free ports (gRPC, HTTP, metrics), learnt from its JSON
    'listening' log event."""

    def __init__(
        self,
        repository: Path,
        *args: str,
        env: dict[str, str] | None = None,
        workers: int | None = 1,
        root: Path = ROOT,
    ):
        """``workers``: one process unless a test or benchmark asks for more (a later
        ``--workers`` in ``args`` wins); None leaves the flag out, as ``make serve`` does,
        so the server picks its own count. ``root``: the checkout whose ``service`` runs
        (another commit's, for a before/after comparison; ``python -m`` imports from the
        working directory first)."""
        self.repository = repository
        # Lines as read; parsed only when someone looks. A busy server writes an access-log
        # line per call, and parsing each as it arrives would spend the CPU of the very
        # process that generates the load.
        self._raw: list[str] = []
        self._parsed: list[dict[str, object]] = []
        self._lines = threading.Condition()
        command = [
            sys.executable,
            "-m",
            "service",
            "--port",
            "0",
            "--metrics-port",
            "0",
            "--http-port",
            "0",
            *([] if workers is None else ["--workers", str(workers)]),
            "--model-repository",
            str(repository.resolve()),  # absolute: ``root`` may be another checkout
            "--log-format",
            "json",
            *args,
        ]
        self.process = subprocess.Popen(
            command,
            cwd=root,
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
            env={**os.environ, **(env or {})},
        )
        threading.Thread(target=self._read, daemon=True).start()
        try:
            listening = self.wait_for_event("listening", timeout=60)
        except BaseException:  # a start that fails or is interrupted leaves nothing running
            self.kill()
            raise
        self.port = int(listening["grpc_port"])  # type: ignore[call-overload]
        self.metrics_port = int(listening["metrics_port"])  # type: ignore[call-overload]
        self.http_port = int(listening["http_port"])  # type: ignore[call-overload]
        self.target = f"127.0.0.1:{self.port}"
        self.http_target = f"127.0.0.1:{self.http_port}"

    @property
    def pid(self) -> int:
        return self.process.pid

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            with self._lines:
                self._raw.append(line)
                self._lines.notify_all()

    @property
    def events(self) -> list[dict[str, object]]:
        """Every log line so far as an event (a non-JSON line becomes ``{"msg": line}``)."""
        with self._lines:
            return self._events()

    def _events(self) -> list[dict[str, object]]:
        for line in self._raw[len(self._parsed) :]:
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                event = {"msg": line.rstrip()}
            self._parsed.append(event)
        return self._parsed

    def wait_for_event(self, msg: str, timeout: float = 60) -> dict[str, object]:
        deadline = time.monotonic() + timeout
        with self._lines:
            while True:
                for event in self._events():
                    if event.get("msg") == msg:
                        return event
                if self.process.poll() is not None:
                    raise RuntimeError(
                        f"server exited ({self.process.returncode}): {self._events()[-5:]}"
                    )
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no {msg!r} event; last: {self._events()[-5:]}")
                self._lines.wait(left)

    def messages(self) -> list[str]:
        with self._lines:
            return [str(e.get("msg")) for e in self._events()]

    def terminate(self, timeout: float = 30) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


def exit_on_sigterm() -> None:
    """Turn SIGTERM into ``SystemExit``, so ``finally`` blocks stop what the bench started.

    Servers and the Triton peer run in sessions of their own (a Ctrl-C in the terminal
    reaches only the bench, which then stops them in order). Without this, a SIGTERM to
    the bench (``timeout``, a CI bound, ``kill``) ends it at once and leaves them running.
    """

    def _exit(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _exit)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PeerProcess:
    """The PyTriton peer from ../shared/peers/pytriton, serving one ONNX model."""

    def __init__(self, peer_dir: Path, venv: Path, model: Path, log: Path):
        self.peer_dir, self.venv = peer_dir, venv
        self.port = free_port()
        self.log = log
        self._log_handle = open(log, "w")  # noqa: SIM115 - lives as long as the process
        self.process = subprocess.Popen(
            ["bash", str(peer_dir / "serve.sh"), str(venv), str(model.resolve()), str(self.port)],
            stdout=self._log_handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait_ready(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the Triton peer exited; see {self.log}")
            if "successfully loaded" in self.log.read_text():
                with socket.socket() as sock:
                    if sock.connect_ex(("127.0.0.1", self.port)) == 0:
                        return
            time.sleep(0.5)
        raise TimeoutError(f"the Triton peer did not become ready; see {self.log}")

    def rss_mb(self) -> float:
        return tree_rss_mb(self.process.pid)

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
        self._log_handle.close()
