"""The device run: on a CUDA machine with the bundle installed, measure the GPU path in one
go and write every figure and log into one folder (``bash bench/device/device.sh run``).

``prepare`` (started in the background once the base archive is in): the demo dataset, the
quick test model (``tests.fixtures``), the demo model exported from its checkpoint, and a
random ResNet-50 at 224 exported in FP32 and FP16 (with the FP16 gate) by our exporter.

``run`` (after the last part), in order, each stage within what is left of ``--budget``:

1. ``env``: the GPU, the packages, the providers; a CUDA session checked against the CPU;
   nvImageCodec decoding a JPEG on the GPU;
2. ``gpu_tests``: ``pytest -m gpu``;
3. ``limit``: in-process, no server: ResNet-50 FP32 and FP16 on CUDA from UINT8 batches
   (with and without the host copies), and from JPEGs decoded on the CPU and on the GPU;
4. ``server``: ``python -m service`` on the GPU (1 and 2 workers) under load from several
   client processes: UINT8 tensors over the Open Inference Protocol, JPEGs over
   classifier.v1 decoded on the GPU and on the CPU, and a concurrency sweep for p50/p99
   against throughput; GPU utilisation from ``nvidia-smi``, the server's CPU, its own
   time split (``/metrics``), and a py-spy profile;
5. ``cpu_workers``: the CPU server on every core, ``--workers 1,2,4,8``, the demo model,
   JPEGs from a client with a channel pool;

then ``results.json``, ``report.md``, ``profile.svg`` and ``logs.tar.gz`` in ``--out``.
A stage that fails is recorded with its error and the next one runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
import traceback
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from bench.device.report import cuda_problem, report_markdown
from bench.processes import alive

ROOT = Path(__file__).resolve().parents[2]
CUDA_PROVIDERS = "CUDAExecutionProvider,CPUExecutionProvider"
GPU_SERVER_FLAGS = (
    "--providers",
    CUDA_PROVIDERS,
    "--max-batch-size",
    "128",
    "--instances",
    "2",
    # Exhaustive search at every one of 128 batch sizes would take the warm-up minutes.
    "--cudnn-conv-algo-search",
    "HEURISTIC",
    "--max-queue-size",
    "8192",
    "--max-inflight-bytes",
    str(4 << 30),
    "--no-access-log",
)


def log(message: str) -> None:
    # One write per line: prepare's two lanes log from two threads.
    sys.stdout.write(f"[{time.strftime('%H:%M:%S')}] {message}\n")
    sys.stdout.flush()


def sh(
    command: list[str], timeout: float, log_file: Path, env: dict[str, str] | None = None
) -> dict[str, Any]:
    """A command with its output in ``log_file``; killed (its whole session) at ``timeout``."""
    started = time.monotonic()
    with open(log_file, "a") as out:
        out.write(f"$ {' '.join(command)}\n")
        out.flush()
        process = subprocess.Popen(
            command,
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )
        try:
            rc = process.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            rc = -9
    tail = log_file.read_text(errors="replace").splitlines()[-15:]
    return {"rc": rc, "seconds": round(time.monotonic() - started, 1), "tail": tail}


# --- prepare --------------------------------------------------------------------------

# The two lanes train and export at once, each with a thread per core. OpenMP's idle
# threads spin, and two spinning pools on the same cores slowed the quick model from
# ~70 s to its 400 s limit in the rehearsal on 2 cores (tests/conftest.py met the same
# under pytest-xdist). Passive waiting keeps the threads without the spinning.
PREPARE_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}


def prepare(work: Path) -> int:
    """Data and models, in two lanes (each uses all cores for a while)."""
    py = sys.executable
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    (work / "prepare.pid").write_text(str(os.getpid()))  # for the run to see it lives
    models, data = work / "models", work / "data"
    steps: dict[str, dict[str, Any]] = {}
    quick = (
        "from pathlib import Path; from tests.fixtures import cached, build_quick_model; "
        f"cached('quick-model', build_quick_model, Path({str(work / 'fixtures')!r}))"
    )
    resnet = (
        "from pathlib import Path; from bench.workload import resnet50_model; "
        f"[print(resnet50_model(Path({str(models)!r}), Path({str(data / 'gate')!r}), p)) "
        "for p in ('fp32', 'fp16')]"
    )
    gate_data = (
        "from pathlib import Path; from training.demo_data import DemoDataConfig, "
        f"build_demo_dataset as b; b(Path({str(data / 'gate')!r}), "
        "DemoDataConfig(train_samples=20, val_samples=300))"
    )
    lanes = {
        "quick_model": [("quick_model", [py, "-c", quick], 400)],
        "models": [
            (
                "demo_data",
                [py, "-m", "training", "-q", "demo-data", "--root", str(data / "demo")],
                200,
            ),
            (
                "demo_export",
                [
                    py,
                    "-m",
                    "training",
                    "-q",
                    "export",
                    str(work / "artifacts" / "demo-best.pt"),
                    "--repository",
                    str(models),
                    "--name",
                    "demo",
                    "--data",
                    str(data / "demo"),
                ],
                300,
            ),
            ("gate_data", [py, "-c", gate_data], 100),
            ("resnet50_export", [py, "-c", resnet], 500),
        ],
    }

    def lane(name: str) -> None:
        for step, command, timeout in lanes[name]:
            # A prepare restarted by the run (see ensure_preparing) keeps what is made.
            made = work / "prepared" / f"{step}.ok"
            if made.is_file():
                steps[step] = {"rc": 0, "seconds": 0.0, "tail": ["made by an earlier prepare"]}
                continue
            log(f"prepare: {step}")
            steps[step] = sh(command, timeout, logs / f"prepare-{step}.log", PREPARE_ENV)
            log(f"prepare: {step} rc={steps[step]['rc']} in {steps[step]['seconds']} s")
            if steps[step]["rc"] == 0:
                made.parent.mkdir(parents=True, exist_ok=True)
                made.touch()

    threads = [threading.Thread(target=lane, args=(name,)) for name in lanes]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    (work / "prepare.json").write_text(json.dumps(steps, indent=1))
    return 0


def prepare_running(work: Path) -> bool:
    """Whether the process that last started prepare (its pid in prepare.pid) lives."""
    try:
        pid = int((work / "prepare.pid").read_text())
    except (OSError, ValueError):
        return False
    return alive(pid)


def ensure_preparing(work: Path) -> threading.Thread | None:
    """Start prepare in this process if nothing has finished it and nothing is running it.

    ``receive`` starts prepare in a session of its own so that it outlives the call, but
    the device tool ends every process of a non-root user when a call returns, setsid or
    not. Waiting on a prepare that is gone would spend the loan on nothing."""
    if (work / "prepare.json").is_file() or prepare_running(work):
        return None
    log("prepare is not running and has not finished: preparing now, beside the run")
    (work / "prepare.started").touch()
    thread = threading.Thread(target=prepare, args=(work,), daemon=True)
    thread.start()
    return thread


# --- measuring ------------------------------------------------------------------------


class GpuSampler:
    """``nvidia-smi`` every 200 ms: utilisation, memory, power, by time."""

    def __init__(self, log_file: Path):
        self.samples: list[tuple[float, float, float, float]] = []
        self._process: subprocess.Popen[str] | None = None
        if shutil.which("nvidia-smi") is None:
            return
        self._log = log_file
        self._process = subprocess.Popen(
            [
                "nvidia-smi",
                "--query-gpu=utilization.gpu,memory.used,power.draw",
                "--format=csv,noheader,nounits",
                "-lms",
                "200",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self._process is not None and self._process.stdout is not None
        for line in self._process.stdout:
            try:
                util, mem, power = (float(v) for v in line.strip().split(", ")[:3])
            except ValueError:
                continue
            self.samples.append((time.monotonic(), util, mem, power))

    def window(self, start: float, end: float) -> dict[str, float] | None:
        inside = [s for s in self.samples if start <= s[0] <= end]
        if not inside:
            return None
        util = [s[1] for s in inside]
        return {
            "gpu_util_mean": round(float(np.mean(util)), 1),
            "gpu_util_max": max(util),
            "gpu_mem_mb_max": max(s[2] for s in inside),
            "power_w_mean": round(float(np.mean([s[3] for s in inside])), 1),
        }

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()


def percentiles(latencies: list[float]) -> dict[str, float]:
    if not latencies:
        return {}
    ms = np.array(latencies) * 1000
    return {q: round(float(np.percentile(ms, int(q[1:]))), 2) for q in ("p50", "p90", "p99")}


_HISTOGRAMS = {
    "preprocess": "classifier_preprocess_duration_seconds",
    "queue": "classifier_queue_duration_seconds",
    "inference": "classifier_inference_duration_seconds",
    "batch_size": "classifier_batch_size",
}


def scrape(port: int) -> dict[str, float]:
    """Sums and counts of the server's time-split histograms (all workers, all labels)."""
    import urllib.request

    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
    except OSError:
        return {}
    out: dict[str, float] = {}
    for line in text.decode().splitlines():
        for key, metric in _HISTOGRAMS.items():
            for suffix in ("_sum", "_count"):
                if line.startswith(metric + suffix):
                    value = float(line.rsplit(" ", 1)[1])
                    out[key + suffix] = out.get(key + suffix, 0.0) + value
    return out


def split_of(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Mean seconds per image in each part, and the mean batch, over a window."""
    out = {}
    for key in _HISTOGRAMS:
        count = after.get(key + "_count", 0) - before.get(key + "_count", 0)
        total = after.get(key + "_sum", 0) - before.get(key + "_sum", 0)
        if count > 0:
            unit = 1 if key == "batch_size" else 1000
            out[f"{key}_mean{'' if key == 'batch_size' else '_ms'}"] = round(
                total / count * unit, 3
            )
    return out


class Run:
    def __init__(self, work: Path, out: Path, budget: float):
        self.work, self.out = work, out
        self.deadline = time.monotonic() + budget
        self.logs = work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        out.mkdir(parents=True, exist_ok=True)
        self.results: dict[str, Any] = {"started": time.strftime("%Y-%m-%d %H:%M:%S")}
        self.gpu = GpuSampler(self.logs / "nvidia-smi.log")
        # bench/device/rehearse.sh: no GPU here on purpose; the GPU stages run on whatever
        # provider starts, so that their code is proven before a loan.
        self.results["rehearsal"] = os.environ.get("IMGCLF_DEVICE_REHEARSAL") == "1"
        self.photos = self._photos()

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def _photos(self) -> Path:
        from bench.workload import photo_folder

        return photo_folder(self.work / "photos")

    def save(self) -> None:
        (self.out / "results.json").write_text(json.dumps(self.results, indent=1, default=str))

    def stage(self, name: str, needs: float, work: Callable[[], Any]) -> None:
        if self.left() < needs:
            self.results[name] = {"skipped": f"{self.left():.0f} s left, needs {needs:.0f}"}
            log(f"{name}: skipped ({self.left():.0f} s left)")
            self.save()
            return
        log(f"{name}: start ({self.left():.0f} s left)")
        started = time.monotonic()
        try:
            self.results[name] = work()
        except Exception as exc:
            self.results[name] = {"error": f"{type(exc).__name__}: {exc}"}
            (self.logs / f"{name}-error.log").write_text(traceback.format_exc())
            log(f"{name}: FAILED: {exc}")
        if isinstance(self.results[name], dict):
            self.results[name]["stage_seconds"] = round(time.monotonic() - started, 1)
        log(f"{name}: done in {time.monotonic() - started:.0f} s")
        self.save()

    def wait_for_prepare(self) -> None:
        """Until ``prepare`` has written its summary (the GPU tests ran meanwhile)."""
        started = time.monotonic()
        done = self.work / "prepare.json"
        while not done.is_file() and self.left() > 120:
            if not (self.work / "prepare.started").is_file():
                break  # nothing is preparing: the stages say what is missing
            time.sleep(2)
        self.results["waited_for_prepare_s"] = round(time.monotonic() - started, 1)
        self.results["prepare"] = json.loads(done.read_text()) if done.is_file() else None
        self.save()

    def _wait_for_file(self, path: Path, seconds: float) -> bool:
        end = time.monotonic() + seconds
        while not path.is_file() and time.monotonic() < end:
            time.sleep(1)
        return path.is_file()

    # --- 1. env ---------------------------------------------------------------------

    def env(self) -> dict[str, Any]:
        import onnxruntime as ort

        info: dict[str, Any] = {
            "python": platform.python_version(),
            "onnxruntime": ort.__version__,
            "providers": ort.get_available_providers(),
            "cores": os.cpu_count(),
            "ld_library_path": os.environ.get("LD_LIBRARY_PATH", ""),
        }
        query = "name,driver_version,memory.total,clocks.max.sm,power.limit,compute_cap"
        try:
            smi = subprocess.run(
                ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"],
                capture_output=True,
                text=True,
            )
            info["gpu"] = smi.stdout.strip() or smi.stderr.strip()
        except OSError as exc:
            info["gpu"] = f"no nvidia-smi: {exc}"
        for package in ("numpy", "grpc", "google.protobuf", "PIL", "torch", "onnx"):
            try:
                module = __import__(package, fromlist=["__version__"])
                info[package] = getattr(module, "__version__", "?")
            except Exception as exc:
                info[package] = f"missing: {exc}"
        # A CUDA session against the CPU on the demo model.
        from service.model.runner import Runner
        from service.model.runner_options import RunnerOptions

        model = self.work / "models" / "demo" / "1" / "model.onnx"
        if self._wait_for_file(model, min(90.0, self.left() - 300)):
            cpu = Runner(model, RunnerOptions(providers=["CPUExecutionProvider"]))
            gpu = Runner(model, RunnerOptions(providers=CUDA_PROVIDERS.split(",")))
            shape = (16, cpu.spec.input.height, cpu.spec.input.width, 3)
            batch = np.random.default_rng(0).integers(0, 256, shape, np.uint8)
            want, got = cpu.run(batch), gpu.run(batch)
            info["cuda_session"] = {
                "providers": gpu.active_providers,
                "max_abs_diff": {k: float(np.abs(want[k] - got[k]).max()) for k in want},
            }
            try:
                from service.model.gpu_decode import device_preprocessor_for
                from service.model.image_header import ImageLimits

                started = time.monotonic()
                device = device_preprocessor_for(gpu, "gpu", ImageLimits())
                info["gpu_decode"] = {
                    "ok": device is not None,
                    "start_seconds": round(time.monotonic() - started, 2),
                }
            except Exception as exc:
                info["gpu_decode"] = {"error": str(exc)}
        return info

    # --- 2. tests -------------------------------------------------------------------

    def gpu_tests(self) -> dict[str, Any]:
        junit = self.logs / "gpu-tests.xml"
        result = sh(
            [
                sys.executable,
                "-m",
                "pytest",
                "-m",
                "gpu",
                "-p",
                "no:cacheprovider",
                "-o",
                "addopts=",
                "-rA",
                "--durations=10",
                f"--junitxml={junit}",
                "tests/integration/service/server/test_gpu.py",
                "tests/integration/service/model/test_gpu_decode.py",
            ],
            min(150.0, self.left() - 250),
            self.logs / "gpu-tests.log",
        )
        counts = re.compile(r"passed|failed|error|skipped")
        summary = [line for line in result["tail"] if counts.search(line)]
        return {"rc": result["rc"], "seconds": result["seconds"], "summary": summary[-3:]}

    # --- 3. limit -------------------------------------------------------------------

    def limit(self) -> dict[str, Any]:
        problem = cuda_problem(self.results)
        if problem:  # the minutes go to the stages that can still measure something
            return {"skipped": problem}
        out: dict[str, Any] = {}
        for name in ("resnet50", "resnet50-fp16"):
            model = self.work / "models" / name / "1" / "model.onnx"
            if not model.is_file():
                out[name] = {"error": "not exported (see prepare)"}
                continue
            target = self.logs / f"limit-{name}.json"
            result = sh(
                [
                    sys.executable,
                    "-m",
                    "bench.device.run",
                    "limit",
                    "--model",
                    str(model),
                    "--images",
                    str(self.photos),
                    "--json",
                    str(target),
                ],
                min(150.0, self.left() - 150),
                self.logs / f"limit-{name}.log",
            )
            out[name] = json.loads(target.read_text()) if target.is_file() else result
        return out

    # --- 4. server ------------------------------------------------------------------

    def load(
        self,
        server: Any,
        *,
        protocol: str,
        payload: str,
        model: str,
        concurrency: int,
        per_request: int,
        processes: int,
        seconds: float = 5.0,
        warmup: float = 2.0,
        channels: int = 4,
    ) -> dict[str, Any]:
        """Closed-loop load from ``processes`` client processes, merged."""
        from bench.processes import tree_cpu_seconds

        tag = f"{protocol}-{payload}-{model}-c{concurrency}-n{per_request}-{time.monotonic():.0f}"
        procs = []
        for k in range(processes):
            command = [
                sys.executable,
                "-m",
                "bench",
                "load",
                "--target",
                server.target,
                "--model",
                model,
                "--protocol",
                protocol,
                "-c",
                str(max(1, concurrency // processes)),
                "--images-per-request",
                str(per_request),
                "--seconds",
                str(seconds),
                "--warmup",
                str(warmup),
                "--channels",
                str(channels),
                "--images",
                str(self.photos),
                "--json",
                str(self.logs / f"load-{tag}-{k}.json"),
                "--latencies",
                str(self.logs / f"load-{tag}-{k}.lat"),
            ]
            if protocol == "oip":
                command += ["--payload", payload]
            procs.append(
                subprocess.Popen(
                    command,
                    cwd=ROOT,
                    stdout=subprocess.DEVNULL,
                    stderr=open(self.logs / f"load-{tag}-{k}.log", "w"),  # noqa: SIM115
                )
            )
        started = time.monotonic()
        time.sleep(warmup + 1.0)  # the clients start, connect and warm up
        window_start = time.monotonic()
        cpu0, metrics0 = tree_cpu_seconds(server.pid), scrape(server.metrics_port)
        time.sleep(max(0.5, seconds - 1.5))
        window_end = time.monotonic()
        cpu1, metrics1 = tree_cpu_seconds(server.pid), scrape(server.metrics_port)
        for proc in procs:
            try:
                proc.wait(timeout=seconds + warmup + 60)
            except subprocess.TimeoutExpired:
                proc.kill()
        images_per_s, latencies, errors = 0.0, [], 0
        for k in range(processes):
            result_file = self.logs / f"load-{tag}-{k}.json"
            if not result_file.is_file():
                errors += 1
                continue
            result = json.loads(result_file.read_text())
            images_per_s += result["images_per_s"]
            errors += sum(result["errors"].values())
            lat = self.logs / f"load-{tag}-{k}.lat"
            latencies += [float(v) for v in lat.read_text().split()] if lat.is_file() else []
        served = images_per_s * (window_end - window_start)
        return {
            "protocol": protocol,
            "payload": payload,
            "concurrency": concurrency,
            "images_per_request": per_request,
            "client_processes": processes,
            "images_per_s": round(images_per_s, 1),
            "latency_ms": percentiles(latencies),
            "errors": errors,
            "server_cpu_ms_per_image": round((cpu1 - cpu0) * 1000 / served, 3) if served else None,
            "server_split": split_of(metrics0, metrics1),
            **(self.gpu.window(window_start, window_end) or {}),
            "wall_seconds": round(time.monotonic() - started, 1),
        }

    def server(self) -> dict[str, Any]:
        from bench.processes import ServerProcess

        problem = cuda_problem(self.results)
        if problem:
            return {"skipped": problem}
        repository = self.work / "serve-gpu"
        if not (self.work / "models" / "resnet50-fp16" / "1" / "model.onnx").is_file():
            return {"error": "resnet50-fp16 was not exported (see prepare)"}
        repository.mkdir(exist_ok=True)
        link = repository / "resnet50-fp16"
        if not link.exists():
            link.symlink_to(self.work / "models" / "resnet50-fp16")
        model = "resnet50-fp16"
        out: dict[str, Any] = {"model": model, "flags": list(GPU_SERVER_FLAGS), "runs": []}
        gpu_decode = bool(self.results.get("env", {}).get("gpu_decode", {}).get("ok"))
        decode = "gpu" if gpu_decode else "auto"  # auto: the server says what it could do
        out["gpu_decode"] = gpu_decode

        def serve(*flags: str) -> Any:
            log_file = self.logs / f"server-{'_'.join(f.strip('-') for f in flags)}.log"
            server = ServerProcess(repository, *GPU_SERVER_FLAGS, *flags)
            server.log_file = log_file  # type: ignore[attr-defined]
            try:
                wait_serving(server, timeout=180)
            except Exception:
                stop(server)
                raise
            return server

        def stop(server: Any) -> None:
            try:
                server.terminate(timeout=30)
            except Exception:
                server.kill()
            server.log_file.write_text("\n".join(json.dumps(e) for e in server.events))

        plan = [
            (
                "gpu decode, 1 worker",
                ("--workers", "1", "--decode-device", decode),
                [
                    ("oip", "tensor", 32, 16, 4),
                    ("oip", "tensor", 64, 1, 4),
                    ("classifier", "jpeg", 32, 16, 4),
                    ("classifier", "jpeg", 4, 16, 2),
                    ("classifier", "jpeg", 128, 16, 4),
                    ("classifier", "jpeg", 64, 1, 4),
                ],
            ),
            (
                "cpu decode, 1 worker",
                ("--workers", "1", "--decode-device", "cpu"),
                [
                    ("classifier", "jpeg", 32, 16, 4),
                ],
            ),
            (
                "gpu decode, 2 workers",
                ("--workers", "2", "--decode-device", decode),
                [
                    ("oip", "tensor", 32, 16, 4),
                    ("classifier", "jpeg", 32, 16, 4),
                ],
            ),
        ]
        for label, flags, loads in plan:
            if self.left() < 60:
                out["runs"].append({"config": label, "skipped": "out of time"})
                continue
            server = serve(*flags)
            out.setdefault("providers", served_providers(server, model))
            try:
                for i, (protocol, payload, c, n, procs) in enumerate(loads):
                    if self.left() < 40:
                        break
                    profile = label.startswith("gpu decode, 1") and i == 2
                    spy = self._profile(server.pid) if profile else None
                    result = self.load(
                        server,
                        protocol=protocol,
                        payload=payload,
                        model=model,
                        concurrency=c,
                        per_request=n,
                        processes=procs,
                    )
                    if spy is not None:
                        result["profile"] = self._profile_done(spy)
                    result["config"] = label
                    log(f"  {label}: {json.dumps(result)}")
                    out["runs"].append(result)
                    self.results["server"] = out
                    self.save()
            finally:
                stop(server)
        return out

    def _profile(self, pid: int) -> subprocess.Popen[bytes] | None:
        if shutil.which("py-spy") is None and not (self.work / "site" / "bin" / "py-spy").exists():
            return None
        spy = shutil.which("py-spy") or str(self.work / "site" / "bin" / "py-spy")
        return subprocess.Popen(
            [
                spy,
                "record",
                "--pid",
                str(pid),
                "--subprocesses",
                "--duration",
                "5",
                "--rate",
                "50",
                "--format",
                "flamegraph",
                "--output",
                str(self.out / "profile.svg"),
            ],
            stdout=open(self.logs / "py-spy.log", "w"),
            stderr=subprocess.STDOUT,
        )

    def _profile_done(self, spy: subprocess.Popen[bytes]) -> str:
        try:
            spy.wait(timeout=20)
        except subprocess.TimeoutExpired:
            spy.kill()
        return "profile.svg" if (self.out / "profile.svg").is_file() else "py-spy failed"

    # --- 5. cpu workers -------------------------------------------------------------

    def cpu_workers(self) -> dict[str, Any]:
        from bench.processes import ServerProcess

        repository = self.work / "serve-cpu"
        repository.mkdir(exist_ok=True)
        link = repository / "demo"
        if not link.exists():
            link.symlink_to(self.work / "models" / "demo")
        out: dict[str, Any] = {"runs": []}
        for workers in (1, 2, 4, 8):
            if self.left() < 20:
                out["runs"].append({"workers": workers, "skipped": "out of time"})
                continue
            server = ServerProcess(
                repository,
                "--providers",
                "CPUExecutionProvider",
                "--decode-device",
                "cpu",
                "--no-access-log",
                "--workers",
                str(workers),
            )
            try:
                wait_serving(server, timeout=120)
                result = self.load(
                    server,
                    protocol="classifier",
                    payload="jpeg",
                    model="demo",
                    concurrency=32,
                    per_request=1,
                    processes=2,
                    channels=8,
                    seconds=5.0,
                )
            finally:
                server.terminate(timeout=30)
            result["workers"] = workers
            log(f"  cpu workers {workers}: {json.dumps(result)}")
            out["runs"].append(result)
        base = next((r["images_per_s"] for r in out["runs"] if r.get("workers") == 1), None)
        for r in out["runs"]:
            if base and "images_per_s" in r:
                r["ratio_to_1_worker"] = round(r["images_per_s"] / base, 2)
        return out

    # --- outputs --------------------------------------------------------------------

    def finish(self) -> None:
        self.gpu.stop()
        self.results["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
        self.save()
        (self.out / "report.md").write_text(report_markdown(self.results))
        with tarfile.open(self.out / "logs.tar.gz", "w:gz") as tar:
            for path in sorted(self.logs.glob("*")):
                if path.suffix != ".lat" and path.stat().st_size < 4 << 20:
                    tar.add(path, arcname=path.name)
            prepare_log = self.work / "prepare.log"
            if prepare_log.is_file():
                tar.add(prepare_log, arcname="prepare.log")


def served_providers(server: Any, model: str) -> list[str] | None:
    """The providers the server's model version runs on, as ListModels reports them."""
    from service.client import ClassifierClient

    try:
        with ClassifierClient(server.target) as client:
            found = [m for m in client.list_models(timeout=10) if m.name == model]
    except Exception as exc:  # the figures still count; the report says it is unknown
        log(f"ListModels failed: {exc}")
        return None
    return list(found[0].providers) if found else None


def wait_serving(server: Any, timeout: float) -> None:
    """Until the server says it serves; at once when a model failed to load."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        messages = server.messages()
        if "serving" in messages:
            return
        failed = [m for m in messages if "failed to load" in m]
        if failed or server.process.poll() is not None:
            raise RuntimeError(f"the server did not start: {failed or messages[-3:]}")
        time.sleep(0.5)
    raise TimeoutError(f"the server was not serving after {timeout:.0f} s")


# --- the limit, in its own process ---------------------------------------------------


def limit_main(model: Path, images: Path, out: Path) -> int:
    """ResNet-50 on CUDA in-process: UINT8 batches (with the host copies, and already on
    the device), then JPEGs decoded on the CPU and on the GPU through ``bench.limit``."""
    import onnxruntime as ort

    from bench.limit import measure_limit
    from bench.workload import load_folder
    from service.model.runner import Runner
    from service.server.config_loading import load_settings

    base: dict[str, Any] = {
        "providers": CUDA_PROVIDERS.split(","),
        "max_batch_size": 256,
        "cudnn_conv_algo_search": "HEURISTIC",
    }
    settings = load_settings(**base, decode_device="cpu")
    runner = Runner(model, settings.runner_options())
    spec = runner.spec
    sizes = (1, 8, 32, 64, 128, 256)
    runner.warmup(sizes)
    rng = np.random.default_rng(0)
    result: dict[str, Any] = {
        "providers": runner.active_providers,
        "tensor": {},
        "device_resident": {},
    }
    for n in sizes:
        batch = rng.integers(0, 256, (n, spec.input.height, spec.input.width, 3), np.uint8)
        result["tensor"][n] = _rate(partial(runner.run, batch), n)
        if runner.on_gpu:
            value = ort.OrtValue.ortvalue_from_numpy(batch, "cuda", 0)
            with runner._session() as session:  # the same session, the batch on the GPU
                result["device_resident"][n] = _rate(
                    partial(runner._run_bound_value, session, value), n
                )
        out.write_text(json.dumps(result, indent=1))
    photos = load_folder(images)
    for decode in ("cpu", "gpu"):
        try:
            limit = measure_limit(
                model,
                photos,
                batch_sizes=(32, 128),
                seconds=3.0,
                latency_samples=30,
                settings=load_settings(**base, decode_device=decode),
            )
            result[f"jpeg_{decode}"] = limit.as_dict()
        except Exception as exc:
            result[f"jpeg_{decode}"] = {"error": f"{type(exc).__name__}: {exc}"}
        out.write_text(json.dumps(result, indent=1))
    return 0


def _rate(work: Callable[[], Any], images: int, seconds: float = 1.0) -> dict[str, float]:
    work()
    times: list[float] = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end or len(times) < 3:
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    median = float(np.median(times))
    return {"images_per_s": round(images / median, 1), "ms_per_batch": round(median * 1000, 3)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.device.run", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--work", type=Path, required=True)
    r = sub.add_parser("run")
    r.add_argument("--work", type=Path, required=True)
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--budget", type=float, default=480.0, help="seconds for the whole run")
    r.add_argument("--stages", default="env,gpu_tests,limit,server,cpu_workers")
    lim = sub.add_parser("limit")
    lim.add_argument("--model", type=Path, required=True)
    lim.add_argument("--images", type=Path, required=True)
    lim.add_argument("--json", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.command == "prepare":
        return prepare(args.work)
    if args.command == "limit":
        return limit_main(args.model, args.images, args.json)
    restarted = ensure_preparing(args.work)
    run = Run(args.work, args.out, args.budget)
    run.results["prepare_restarted_by_run"] = restarted is not None
    stages = {
        "env": (20, run.env),
        "gpu_tests": (120, run.gpu_tests),
        "limit": (100, run.limit),
        "server": (90, run.server),
        "cpu_workers": (40, run.cpu_workers),
    }
    try:
        for name in args.stages.split(","):
            if name == "limit":  # the first stage that needs every model: prepare is done
                run.wait_for_prepare()
            needs, work = stages[name]
            run.stage(name, needs, work)
    finally:
        run.finish()
    print(report_markdown(run.results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
