"""The Ray engine on a real cluster: separate Ray nodes on this machine (Ray's own
``ray.cluster_utils.Cluster``: a head with no CPUs that only coordinates, as the RayJob's
does, and two worker nodes, each its own raylet), joined by a scoring process started with
``--address auto`` and ``RAY_ADDRESS``, as the RayJob's entrypoint runs. A worker node is
lost while its actor is running a batch, and the driver is killed mid-job; each time,
every input ends up in the output exactly once and equal to the local engine's."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

IMAGES = 480
SHARD = 40
SHARDS = IMAGES // SHARD
BOX_KEYS = ("box_x_min", "box_y_min", "box_x_max", "box_y_max", "box_score")


@pytest.fixture(scope="module")
def images(quick_model: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """IMAGES distinct paths (the quick model's val images, repeated under new names)."""
    root = tmp_path_factory.mktemp("ray-inputs")
    sources = sorted((quick_model["data"] / "val").rglob("*.jpg"))
    for i in range(IMAGES):
        source = sources[i % len(sources)]
        shutil.copy(source, root / f"{i:04d}-{source.name}")
    return root


@pytest.fixture(scope="module")
def local_rows(
    quick_model: dict[str, Path], images: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, dict[str, Any]]:
    out = tmp_path_factory.mktemp("local") / "scores.jsonl"
    done = subprocess.run(
        scoring_command(quick_model, images, out, "--engine", "local"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return rows_by_path(out)


@pytest.fixture
def cluster() -> Iterator[Any]:
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False}
    )
    try:
        for _ in range(2):
            cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        yield cluster
    finally:
        cluster.shutdown()


def scoring_command(model: dict[str, Path], images: Path, out: Path, *engine: str) -> list[str]:
    """The RayJob's entrypoint (deploy/ray/rayjob.yaml), on the quick model."""
    return [
        sys.executable,
        "-m",
        "service.scoring",
        "--no-progress",
        "--model",
        str(model["repository"] / "demo"),
        "--input",
        str(images),
        "--output",
        str(out),
        "--task",
        "localize",
        "--batch-size",
        "8",
        "--shard-size",
        str(SHARD),
        *engine,
    ]


def start_on_cluster(
    model: dict[str, Path], images: Path, out: Path, cluster: Any, log: Path
) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        scoring_command(model, images, out, "--engine", "ray", "--address", "auto"),
        env={**os.environ, "RAY_ADDRESS": cluster.address},
        stdout=open(log, "wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def finish(job: subprocess.Popen[bytes], log: Path, timeout: float = 240) -> str:
    try:
        code = job.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(job.pid, signal.SIGKILL)
        pytest.fail(f"the job did not finish in {timeout} s:\n{tail(log)}")
    assert code == 0, tail(log)
    summary = [line for line in log.read_text(errors="replace").splitlines() if "scored " in line]
    assert summary, tail(log)
    return summary[-1]


def tail(log: Path) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-30:])


def committed_shards(out: Path) -> int:
    parts = out.with_name(f".{out.name}.parts")
    return len(list(parts.glob("part-*.jsonl"))) if parts.is_dir() else 0


def wait_for(
    condition: Callable[[], bool], timeout: float, what: str, job: subprocess.Popen[bytes]
) -> None:
    """Until ``condition`` holds; the job is killed if it never does."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            job.kill()
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.1)


def running_batch(node: Any) -> bool:
    """Whether a scoring actor on this node is running a batch right now: Ray titles a
    worker process ``ray::Class.method`` while it runs a method (``ray::Class`` when idle)."""
    raylet = psutil.Process(node.all_processes["raylet"][0].process.pid)
    for process in raylet.children(recursive=True):
        try:
            title = " ".join(process.cmdline())
        except psutil.Error:
            continue
        if re.match(r"ray::MapWorker\(MapBatches\(_ScoringActor\)\)\.(?!__init__)\w+", title):
            return True
    return False


def rows_by_path(out: Path) -> dict[str, dict[str, Any]]:
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    by_path = {row["path"]: row for row in rows}
    assert len(by_path) == len(rows), "an input appears more than once"
    return by_path


def assert_equal_to_local(out: Path, local: dict[str, dict[str, Any]]) -> None:
    got = rows_by_path(out)
    assert set(got) == set(local), "the cluster's rows are not the local engine's inputs"
    for path, row in got.items():
        want = local[path]
        assert row["error"] is None and want["error"] is None, path
        assert row["labels"] == want["labels"] and row["indices"] == want["indices"], path
        assert row["scores"] == pytest.approx(want["scores"], abs=1e-5), path
        for key in BOX_KEYS:
            assert row[key] == pytest.approx(want[key], abs=1e-5), (path, key)


def test_losing_a_worker_node_whose_actor_runs_a_batch_the_job_finishes_by_itself(
    quick_model: dict[str, Path],
    images: Path,
    local_rows: dict[str, dict[str, Any]],
    cluster: Any,
    tmp_path: Path,
) -> None:
    out, log = tmp_path / "scores.jsonl", tmp_path / "job.log"
    job = start_on_cluster(quick_model, images, out, cluster, log)
    victim = next(iter(cluster.worker_nodes))
    wait_for(lambda: running_batch(victim), 120, "a batch running on the node to lose", job)
    before = committed_shards(out)
    assert before < SHARDS and job.poll() is None, "the job ended before the node was lost"
    # Its raylet, object store and workers, killed at once (a machine lost, not drained).
    cluster.remove_node(victim, allow_graceful=False)

    summary = finish(job, log)
    assert f"scored {IMAGES} of {IMAGES} inputs (0 already done), 0 errors" in summary
    assert_equal_to_local(out, local_rows)


def test_a_driver_killed_mid_job_is_resumed_by_a_rerun_exactly_once(
    quick_model: dict[str, Path],
    images: Path,
    local_rows: dict[str, dict[str, Any]],
    cluster: Any,
    tmp_path: Path,
) -> None:
    out, log = tmp_path / "scores.jsonl", tmp_path / "job.log"
    job = start_on_cluster(quick_model, images, out, cluster, log)
    wait_for(lambda: committed_shards(out) >= 2, 120, "two committed shards", job)
    assert job.poll() is None, "the job ended before its driver was killed"
    os.kill(job.pid, signal.SIGKILL)  # the driver only: the cluster keeps running
    job.wait()
    killed_at = committed_shards(out)
    assert 2 <= killed_at < SHARDS
    assert not out.exists(), "a killed job must not have assembled its output"

    rerun_log = tmp_path / "rerun.log"
    summary = finish(start_on_cluster(quick_model, images, out, cluster, rerun_log), rerun_log)
    done = re.search(r"scored (\d+) of (\d+) inputs \((\d+) already done\), 0 errors", summary)
    assert done, summary
    scored, inputs, skipped = map(int, done.groups())
    assert inputs == IMAGES and skipped >= killed_at * SHARD and scored + skipped == IMAGES
    assert_equal_to_local(out, local_rows)
