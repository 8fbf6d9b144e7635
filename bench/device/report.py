"""The device run's ``report.md`` from its ``results.json``, and the one judgement the run
makes from its own results: whether CUDA started.

A GPU loan is minutes long and read afterwards from these files alone, so the report says
for every stage whether it ran, was skipped and why, or failed and with what; and it never
labels figures "CUDA" that came from the CPU: a server or limit whose model fell back to
the CPU provider is flagged where its figures are.
"""

from __future__ import annotations

from typing import Any

CUDA = "CUDAExecutionProvider"
STAGES = ("env", "gpu_tests", "limit", "server", "cpu_workers")


def cuda_problem(results: dict[str, Any]) -> str | None:
    """Why the GPU stages cannot measure a GPU, from the env stage; None if CUDA ran (or
    env could not tell, when the GPU stages try for themselves). In a rehearsal (no GPU
    on purpose) there is none: the stages run on the CPU to prove their code."""
    if results.get("rehearsal"):
        return None
    env = results.get("env")
    if not isinstance(env, dict) or "cuda_session" not in env:
        return None
    providers = env["cuda_session"].get("providers", [])
    if CUDA in providers:
        return None
    gpu = env.get("gpu", "?")
    return f"CUDA could not start: the demo model's CUDA session ran on {providers} (GPU: {gpu})"


def stage_line(name: str, value: Any) -> str:
    if value is None:
        return f"- {name}: not run"
    if isinstance(value, dict) and "skipped" in value:
        return f"- {name}: skipped: {value['skipped']}"
    if isinstance(value, dict) and "error" in value:
        return f"- {name}: FAILED: {value['error']}"
    seconds = value.get("stage_seconds") if isinstance(value, dict) else None
    return f"- {name}: done in {seconds} s"


def _where(providers: list[str] | None) -> str:
    if not providers:
        return "providers unknown"
    return ", ".join(providers) + ("" if CUDA in providers else " — NOT ON THE GPU")


def _limit_lines(limit: Any) -> list[str]:
    lines: list[str] = []
    for name, value in limit.items() if isinstance(limit, dict) else []:
        if not isinstance(value, dict):
            continue
        if "tensor" not in value:
            detail = value.get("error") or f"rc {value.get('rc')}: {value.get('tail', [])[-1:]}"
            lines += [f"## limit {name}: no figures ({detail})", ""]
            continue
        lines.append(f"## limit {name} ({_where(value.get('providers'))})")
        lines.append(f"- UINT8 batches (img/s by batch): {value['tensor']}")
        lines.append(f"- UINT8 on the device already: {value.get('device_resident')}")
        for decode in ("jpeg_cpu", "jpeg_gpu"):
            if decode in value:
                lines.append(f"- {decode}: {value[decode]}")
        lines.append("")
    return lines


def _server_lines(server: Any) -> list[str]:
    if not isinstance(server, dict) or not server.get("runs"):
        return []
    lines = [
        f"## server ({server.get('model')}, {_where(server.get('providers'))})",
        "| config | protocol | payload | c | img/req | img/s | p50 ms | p99 ms | GPU % "
        "| server CPU ms/img | split |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in server["runs"]:
        if "images_per_s" not in r:
            lines.append(f"| {r.get('config')} | skipped: {r.get('skipped')} |")
            continue
        lat = r.get("latency_ms", {})
        rate = r["images_per_s"] if lat else "no call completed in the window"
        lines.append(
            f"| {r['config']} | {r['protocol']} | {r['payload']} | {r['concurrency']} | "
            f"{r['images_per_request']} | {rate} | {lat.get('p50')} | "
            f"{lat.get('p99')} | {r.get('gpu_util_mean')} | "
            f"{r.get('server_cpu_ms_per_image')} | {r.get('server_split')} |"
        )
    return [*lines, ""]


def _cpu_lines(cpu: Any) -> list[str]:
    if not isinstance(cpu, dict) or not cpu.get("runs"):
        return []
    lines = [
        "## CPU workers (demo model, JPEG, classifier.v1)",
        "| workers | img/s | ratio | p50 ms | p99 ms | server CPU ms/img |",
        "|---|---|---|---|---|---|",
    ]
    for r in cpu["runs"]:
        if "images_per_s" not in r:
            lines.append(f"| {r.get('workers')} | skipped: {r.get('skipped')} |")
            continue
        lat = r.get("latency_ms", {})
        lines.append(
            f"| {r['workers']} | {r['images_per_s']} | {r.get('ratio_to_1_worker')} | "
            f"{lat.get('p50')} | {lat.get('p99')} | {r.get('server_cpu_ms_per_image')} |"
        )
    return [*lines, ""]


def report_markdown(results: dict[str, Any]) -> str:
    env = results.get("env", {}) if isinstance(results.get("env"), dict) else {}
    lines = [
        f"# Device run {results.get('started')}",
        "",
        f"GPU: {env.get('gpu')}; ONNX Runtime {env.get('onnxruntime')}; cores {env.get('cores')}",
        "",
    ]
    if results.get("rehearsal"):
        lines += ["A rehearsal without a GPU: the GPU stages ran on the CPU.", ""]
    problem = cuda_problem(results)
    if problem:
        lines += [f"**{problem}.** The GPU stages were skipped; see env in results.json.", ""]
    lines += ["## stages", *(stage_line(n, results.get(n)) for n in STAGES)]
    lines.append(f"- waited for prepare: {results.get('waited_for_prepare_s')} s")
    lines.append("")
    tests = results.get("gpu_tests", {})
    if isinstance(tests, dict) and "rc" in tests:
        lines += [f"GPU tests: rc {tests.get('rc')} {tests.get('summary')}", ""]
    lines += _limit_lines(results.get("limit"))
    lines += _server_lines(results.get("server"))
    lines += _cpu_lines(results.get("cpu_workers"))
    return "\n".join(lines) + "\n"
