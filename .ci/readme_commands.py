"""Run every command of README.md as written: each line of its ```bash blocks, and each
```python block whole, in the repository root with the project's virtual environment on
PATH (what `source .venv/bin/activate` gives a reader).

Run it on a fresh clone, as CI does: `make readme-check`. When nothing answers on the gRPC
port it starts `make serve` itself (building the demo model as a new user would) and
reports the time to SERVING; it stops that server at the end. Each command passes when it
exits 0 within its time limit. The exceptions are listed in POLICIES with their reason:

* bounded: commands that run for many minutes (a full training run, the benchmark report)
  pass when they are still working, without an error, at their bound, or exit 0 before;
* background: a command ending in `&` starts a server; the next commands run once its
  `--port` accepts connections, and it is stopped at the end. The command right after it
  is retried for up to a minute, as a reader would retry while the server loads its model;
* elsewhere: `make serve`/`make test` (CI runs them itself), `docker` (no daemon here;
  the image is built and run by `make image-test`) and the device run's
  `bench/device/device.sh` (it runs on a CUDA machine with Python 3.12, against the parts
  of `make gpu-bundle`; its logic is unit-tested in tests/unit/bench/device), and its
  rehearsal here, `make gpu-rehearsal` (4 GB of PyTorch and CUDA wheels into a Python 3.12
  venv: run by hand before a GPU loan).

A command the table does not name runs with the default policy, so a new README command
is checked the day it is written. Files the commands create are removed before and after.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DEFAULT_TIMEOUT = 180.0
PORT_WAIT_SECONDS = 90.0
GRPC_PORT = 50051
SERVER_START_RETRY_SECONDS = 60.0
SERVE_GIVE_UP_SECONDS = 1200.0
CREATED = [
    "models/demo/2",
    "models/demo/.incoming",
    "models/demo/traffic.json",
    "server.key",
    "server.pem",
    "tokens",
    "out.png",
    "scores",
    "scores.jsonl",
    ".scores.jsonl.parts",
    "scores-grpc",
    "scores-ray",
    "list.csv",
    "runs/explain",
    "runs/compare",
]


@dataclass(frozen=True)
class Policy:
    kind: str  # "run", "bounded", "elsewhere"
    seconds: float = DEFAULT_TIMEOUT
    why: str = ""


# Keyed by the start of the command as the README writes it (continuation lines joined).
POLICIES: dict[str, Policy] = {
    "make serve": Policy("elsewhere", why="CI runs it before this check; its server is used"),
    "make test": Policy("elsewhere", why="CI runs it as its own step"),
    "docker build": Policy("elsewhere", why="no Docker daemon; make image-test builds it"),
    "docker compose": Policy("elsewhere", why="no Docker daemon; make image-test runs it"),
    "bash bench/device/device.sh": Policy(
        "elsewhere", why="runs on a CUDA 13 machine with Python 3.12 and the GPU bundle's parts"
    ),
    "make gpu-rehearsal": Policy(
        "elsewhere",
        why="4 GB of PyTorch and CUDA wheels into a Python 3.12 venv; run before a GPU loan",
    ),
    "python -m training train --config training/configs/demo.yaml": Policy(
        "bounded", 20, "the full run takes minutes; make serve has just run it whole"
    ),
    "python -m training compare": Policy(
        "bounded", 60, "trains and exports four backbones, many minutes"
    ),
    "python -m bench report --case resnet50": Policy(
        "bounded", 60, "exports a ResNet-50 and benchmarks it for many minutes"
    ),
    "python -m bench report": Policy("bounded", 60, "the interleaved report takes minutes"),
    "python -m bench scoring": Policy("bounded", 90, "measures every engine for minutes"),
    "python -m bench features": Policy("bounded", 60, "six variants, three rounds: minutes"),
    "python -m service.scoring --engine ray": Policy("run", 300, "Ray starts in ~30 s"),
}


def policy_for(command: str) -> Policy:
    matches = [key for key in POLICIES if command.startswith(key)]
    return POLICIES[max(matches, key=len)] if matches else Policy("run")


def readme_commands(text: str) -> list[tuple[str, str]]:
    """("bash", one command) for each line of a bash block; ("python", code) per block."""
    out: list[tuple[str, str]] = []
    for lang, body in re.findall(r"^```(bash|python)\n(.*?)^```", text, re.M | re.S):
        if lang == "python":
            out.append(("python", body))
            continue
        joined = re.sub(r"\\\n\s*", " ", body)
        out.extend(("bash", line.strip()) for line in joined.splitlines() if line.strip())
    return out


def environment() -> dict[str, str]:
    env = dict(os.environ)
    venv = ROOT / ".venv"
    env["VIRTUAL_ENV"] = str(venv)
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    return env


def clean() -> None:
    for name in CREATED:
        subprocess.run(["rm", "-rf", str(ROOT / name)], check=True)


def wait_for_port(port: int, seconds: float) -> bool:
    give_up = time.monotonic() + seconds
    while time.monotonic() < give_up:
        with socket.socket() as sock:
            sock.settimeout(1.0)
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return True
        time.sleep(0.5)
    return False


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def run(kind: str, command: str, policy: Policy, log: Path) -> tuple[bool, str]:
    python = str(ROOT / ".venv" / "bin" / "python")
    argv = ["bash", "-c", command] if kind == "bash" else [python, "-c", command]
    with open(log, "wb") as out:
        process = subprocess.Popen(
            argv, cwd=ROOT, env=environment(), stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        try:
            rc = process.wait(policy.seconds)
        except subprocess.TimeoutExpired:
            stop(process)
            text = log.read_text(errors="replace")
            if policy.kind == "bounded" and "Traceback" not in text:
                return True, f"still working at its bound of {policy.seconds:.0f} s"
            return False, f"no answer within {policy.seconds:.0f} s"
    if rc != 0:
        return False, f"exit status {rc}"
    return True, "exit status 0"


def serving() -> bool:
    health = [str(ROOT / ".venv" / "bin" / "python"), "-m", "service.client", "health"]
    out = subprocess.run(health, cwd=ROOT, capture_output=True, text=True, env=environment())
    return out.returncode == 0 and "SERVING" in out.stdout and "NOT_SERVING" not in out.stdout


def start_make_serve(log: Path) -> subprocess.Popen[bytes]:
    """`make serve` as the README says, timed until health answers SERVING."""
    started = time.monotonic()
    with open(log, "wb") as out:
        server = subprocess.Popen(
            ["make", "serve"], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    while not (wait_for_port(GRPC_PORT, 5.0) and serving()):
        if server.poll() is not None:
            sys.exit(f"make serve exited with {server.returncode}; see {log}")
        if time.monotonic() - started > SERVE_GIVE_UP_SECONDS:
            stop(server)
            sys.exit(f"make serve was not SERVING after {SERVE_GIVE_UP_SECONDS:.0f} s; see {log}")
    print(f"make serve: SERVING after {time.monotonic() - started:.0f} s", flush=True)
    return server


def main() -> int:
    text = README.read_text()
    commands = readme_commands(text)
    logs = ROOT / ".ci" / "readme-logs"
    logs.mkdir(exist_ok=True)
    clean()
    background: list[subprocess.Popen[bytes]] = []
    if not wait_for_port(GRPC_PORT, 0.5):
        background.append(start_make_serve(logs / "make-serve.log"))
    failed = 0
    just_started = False
    try:
        for n, (kind, command) in enumerate(commands, 1):
            policy = policy_for(command) if kind == "bash" else Policy("run")
            shown = command if kind == "bash" else f"python block: {command.splitlines()[-1]}"
            if policy.kind == "elsewhere":
                print(f"SKIP {shown}\n     {policy.why}", flush=True)
                continue
            log = logs / f"{n:02d}.log"
            started = time.monotonic()
            if kind == "bash" and command.endswith("&"):
                port = re.search(r"--port (\d+)", command)
                with open(log, "wb") as out:
                    server = subprocess.Popen(
                        ["bash", "-c", command.rstrip("& ")], cwd=ROOT, env=environment(),
                        stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                    )  # fmt: skip
                background.append(server)
                ok = port is not None and wait_for_port(int(port.group(1)), PORT_WAIT_SECONDS)
                why = "listening" if ok else "its --port never opened"
                just_started = True
            else:
                ok, why = run(kind, command, policy, log)
                give_up = time.monotonic() + SERVER_START_RETRY_SECONDS
                while just_started and not ok and time.monotonic() < give_up:
                    time.sleep(2.0)
                    ok, why = run(kind, command, policy, log)
                just_started = False
            seconds = time.monotonic() - started
            print(f"{'PASS' if ok else 'FAIL'} {shown}  ({why}, {seconds:.1f} s)", flush=True)
            if not ok:
                failed += 1
                tail = log.read_text(errors="replace").splitlines()[-15:]
                print("\n".join(f"     | {line}" for line in tail), flush=True)
    finally:
        for server in background:
            stop(server)
        clean()
    total = sum(1 for kind, c in commands if kind == "python" or policy_for(c).kind != "elsewhere")
    print(f"{total - failed} of {total} README commands ran as written; {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
