"""The device run's report: every stage's fate is stated, figures from the CPU are never
labelled as the GPU's, and a failed CUDA start is found from the env stage."""

from __future__ import annotations

from typing import Any

from bench.device.report import cuda_problem, report_markdown

CPU_ONLY = {"cuda_session": {"providers": ["CPUExecutionProvider"]}, "gpu": "no nvidia-smi"}
ON_CUDA = {"cuda_session": {"providers": ["CUDAExecutionProvider", "CPUExecutionProvider"]}}


def run(**stages: Any) -> dict[str, Any]:
    return {"started": "2026-12-05 03:43:01", **stages}


def test_cuda_problem_is_read_from_the_env_stage() -> None:
    assert cuda_problem(run()) is None  # env did not get that far: the stages try
    assert cuda_problem(run(env={"error": "boom"})) is None
    assert cuda_problem(run(env=ON_CUDA)) is None
    problem = cuda_problem(run(env=CPU_ONLY))
    assert problem is not None
    assert "CUDA could not start" in problem and "CPUExecutionProvider" in problem
    assert cuda_problem(run(env=CPU_ONLY, rehearsal=True)) is None  # no GPU on purpose


def test_every_stage_says_whether_it_ran_was_skipped_or_failed() -> None:
    text = report_markdown(
        run(
            env={**ON_CUDA, "stage_seconds": 12.0},
            gpu_tests={"rc": 0, "summary": ["9 passed"], "stage_seconds": 40.0},
            limit={"error": "TimeoutError: slow"},
            server={"skipped": "30 s left, needs 90"},
        )
    )
    assert "- env: done in 12.0 s" in text
    assert "- gpu_tests: done in 40.0 s" in text
    assert "- limit: FAILED: TimeoutError: slow" in text
    assert "- server: skipped: 30 s left, needs 90" in text
    assert "- cpu_workers: not run" in text
    assert "CUDA could not start" not in text


def test_a_cuda_failure_is_stated_at_the_top() -> None:
    problem = cuda_problem(run(env=CPU_ONLY))
    text = report_markdown(run(env=CPU_ONLY, limit={"skipped": problem}))
    assert text.index("CUDA could not start") < text.index("## stages")


def test_server_figures_from_the_cpu_are_flagged_and_empty_windows_named() -> None:
    load = {
        "config": "gpu decode, 1 worker",
        "protocol": "oip",
        "payload": "tensor",
        "concurrency": 32,
        "images_per_request": 16,
    }
    server = {
        "model": "resnet50-fp16",
        "providers": ["CPUExecutionProvider"],
        "runs": [
            {**load, "images_per_s": 0.0, "latency_ms": {}},
            {**load, "images_per_s": 39.0, "latency_ms": {"p50": 1121.0, "p99": 2343.0}},
            {"config": "gpu decode, 2 workers", "skipped": "out of time"},
        ],
    }
    text = report_markdown(run(server=server))
    assert "## server (resnet50-fp16, CPUExecutionProvider — NOT ON THE GPU)" in text
    assert "no call completed in the window" in text
    assert "| 39.0 | 1121.0 | 2343.0 |" in text
    assert "| gpu decode, 2 workers | skipped: out of time |" in text
    on_gpu = report_markdown(
        run(server={**server, "providers": ON_CUDA["cuda_session"]["providers"]})
    )
    assert "NOT ON THE GPU" not in on_gpu


def test_limit_without_figures_says_why_and_cpu_workers_give_the_ratio() -> None:
    text = report_markdown(
        run(
            limit={
                "resnet50": {"rc": -9, "tail": ["...", "killed at its time limit"]},
                "resnet50-fp16": {"providers": ["CUDAExecutionProvider"], "tensor": {"8": 1}},
            },
            cpu_workers={
                "runs": [
                    {"workers": 1, "images_per_s": 100.0, "ratio_to_1_worker": 1.0},
                    {"workers": 2, "images_per_s": 190.0, "ratio_to_1_worker": 1.9},
                    {"workers": 8, "skipped": "out of time"},
                ]
            },
        )
    )
    assert "## limit resnet50: no figures (rc -9: ['killed at its time limit'])" in text
    assert "## limit resnet50-fp16 (CUDAExecutionProvider)" in text
    assert "| 2 | 190.0 | 1.9 |" in text
    assert "| 8 | skipped: out of time |" in text
