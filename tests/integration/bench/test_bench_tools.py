"""Smoke tests of the benchmark tools (the benchmarks themselves are not tests)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.load import check_loopback
from bench.processes import alive
from tests.integration.service.conftest import ServerProcess

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _val_folder(quick_model: dict[str, Path]) -> Path:
    return quick_model["data"] / "val" / "3"


def test_bench_load_two_seconds_against_a_real_server(quick_model: dict[str, Path]) -> None:
    server = ServerProcess(quick_model["repository"])
    try:
        server.wait_for_event("serving")
        for extra in (["-c", "4"], ["--rate", "50"]):
            out = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "bench",
                    "load",
                    "--target",
                    server.target,
                    "--images",
                    str(_val_folder(quick_model)),
                    "--seconds",
                    "2",
                    "--warmup",
                    "0.5",
                    "--images-per-request",
                    "2",
                    *extra,
                ],
                capture_output=True,
                text=True,
                check=True,
                timeout=120,
            )
            result = json.loads(out.stdout)
            for key in (
                "mode",
                "requests",
                "images",
                "requests_per_s",
                "images_per_s",
                "latency_ms",
                "errors",
                "seconds",
            ):
                assert key in result, key
            assert result["requests"] > 0 and result["images"] == 2 * result["requests"]
            assert result["errors"] == {}
            assert {"p50", "p90", "p99", "max"} <= set(result["latency_ms"])
            assert result["latency_ms"]["p50"] <= result["latency_ms"]["p99"]
            assert 0 < result["machine_busy_percent"] <= 100  # the load itself keeps it busy
            assert "img/s" in out.stderr  # the one-line summary
        oip = subprocess.run(
            [
                sys.executable,
                "-m",
                "bench",
                "load",
                "--protocol",
                "oip",
                "--target",
                server.target,
                "--model",
                "demo",
                "--images",
                str(_val_folder(quick_model)),
                "--seconds",
                "2",
                "--warmup",
                "0.5",
                "-c",
                "4",
            ],
            capture_output=True,
            text=True,
            check=True,
            timeout=120,
        )
        result = json.loads(oip.stdout)  # tritonclient, one BYTES JPEG per request
        assert result["requests"] > 0 and result["errors"] == {}
        tensors = subprocess.run(
            [*oip.args, "--payload", "tensor"],  # UINT8 [1, 64, 64, 3]: no decode there
            capture_output=True,
            text=True,
            check=True,
            timeout=120,
        )
        result = json.loads(tensors.stdout)
        # A tensor of the wrong name, type or size would come back INVALID_ARGUMENT.
        assert result["requests"] > 0 and result["errors"] == {}
    finally:
        server.kill()


def test_bench_limit_reports_throughput_and_latency(quick_model: dict[str, Path]) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "limit",
            "--model",
            str(quick_model["model"]),
            "--images",
            str(_val_folder(quick_model)),
            "--seconds",
            "0.3",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    result = json.loads(out.stdout)
    assert result["best_images_per_s"] > 0
    assert result["best_batch"] in (1, 8, 16, 32)
    assert result["batch1_latency_ms"]["p50"] > 0


def test_only_loopback_targets() -> None:
    check_loopback("localhost:1")
    check_loopback("127.0.0.1:50051")
    with pytest.raises(ValueError, match="only targets this machine"):
        check_loopback("10.0.0.8:50051")


def test_bench_scoring_compares_engines_with_the_limit(
    quick_model: dict[str, Path], tmp_path: Path
) -> None:
    inputs = _val_folder(quick_model)
    count = len(list(inputs.glob("*.jpg")))
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "scoring",
            "--model",
            str(quick_model["repository"] / "demo"),
            "--input",
            str(inputs),
            "--engines",
            "local,grpc",
            "--limit-seconds",
            "0.2",
            "--results",
            str(tmp_path),
            "--scratch",
            str(tmp_path / "scratch"),
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=240,
    )
    ratios = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(ratios) == {"local / limit", "grpc / local"}
    (report_file,) = tmp_path.glob("*-scoring-demo.json")
    report = json.loads(report_file.read_text())
    assert [r["engine"] for r in report["runs"]] == ["local", "grpc", "local"]
    for run in report["runs"]:
        assert run["scored"] == count and run["errors"] == 0
        assert run["images_per_s"] > 0
    assert report["limit"]["best_images_per_s"] > 0
    assert (tmp_path / report_file.name.replace(".json", ".md")).read_text().startswith("# ")


FAKE_PEER = """#!/bin/bash
# serve.sh VENV MODEL PORT, as the real peer's: listens, says it loaded, writes its pid.
exec python3 -c '
import os, socket, sys, time
server = socket.create_server(("127.0.0.1", int(sys.argv[1])))
open(sys.argv[2], "w").write(str(os.getpid()))
print("successfully loaded", flush=True)
time.sleep(600)
' "$3" "$(dirname "$0")/peer.pid"
"""


def test_sigterm_to_bench_report_stops_its_servers_and_the_peer(
    quick_model: dict[str, Path], tmp_path: Path
) -> None:
    """A bound (timeout, CI) ends the report with SIGTERM: what it started must not outlive
    it, although servers and peer run in sessions of their own."""
    peer_dir, venv = tmp_path / "peer", tmp_path / "venv"
    peer_dir.mkdir()
    (peer_dir / "serve.sh").write_text(FAKE_PEER)
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(sys.executable)
    report = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bench",
            "report",
            "--repository",
            str(quick_model["repository"]),
            "--workers",
            "1",
            "--concurrency",
            "1",
            "--seconds",
            "30",
            "--peer-dir",
            str(peer_dir),
            "--peer-venv",
            str(venv),
            "--results",
            str(tmp_path),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    pid_file = peer_dir / "peer.pid"
    deadline = time.monotonic() + 300
    while not pid_file.is_file() or not pid_file.read_text():
        assert report.poll() is None, "bench report ended before it started the peer"
        assert time.monotonic() < deadline, "the peer never started"
        time.sleep(0.5)
    peer_pid = int(pid_file.read_text())
    server_pids = [
        int(p.name)
        for p in Path("/proc").iterdir()
        if p.name.isdigit()
        and str(quick_model["repository"]).encode() in _cmdline(p)
        and b"service" in _cmdline(p)
    ]
    assert server_pids, "no server of the report's found"
    floor_pids = [
        int(p.name)
        for p in Path("/proc").iterdir()
        if p.name.isdigit() and b"bench.floor" in _cmdline(p) and _parent(p) == report.pid
    ]
    assert floor_pids, "no gRPC floor server of the report's found"
    report.send_signal(signal.SIGTERM)
    assert report.wait(60) == 128 + signal.SIGTERM
    deadline = time.monotonic() + 30
    while any(alive(pid) for pid in [peer_pid, *server_pids, *floor_pids]):
        assert time.monotonic() < deadline, "the peer or a server outlived bench report"
        time.sleep(0.2)


def _parent(proc: Path) -> int | None:
    try:
        return int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def _cmdline(proc: Path) -> bytes:
    try:
        return (proc / "cmdline").read_bytes()
    except OSError:
        return b""


def test_the_grpc_floor_answers_classify_at_once() -> None:
    from bench.floor import ANSWER, FloorProcess
    from service.client import ClassifierClient

    floor = FloorProcess()
    try:
        with ClassifierClient(floor.target, channels=1) as client:
            (result,) = client.classify([b"not even an image: the floor decodes nothing"])
        assert [p.label for p in result.predictions] == [
            p.label for p in ANSWER.results[0].predictions
        ]
    finally:
        floor.stop()
    assert floor.process.poll() is not None


def test_the_grpc_floor_ends_when_the_bench_that_started_it_is_killed() -> None:
    bench = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from bench.floor import FloorProcess; import time; "
            "print(FloorProcess().pid, flush=True); time.sleep(120)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert bench.stdout is not None
    floor_pid = int(bench.stdout.readline())
    assert alive(floor_pid)
    bench.kill()  # no finally block runs: only the kernel can tell the floor
    bench.wait(10)
    deadline = time.monotonic() + 30
    while alive(floor_pid):
        assert time.monotonic() < deadline, "the floor server outlived its bench"
        time.sleep(0.2)
