"""The Ray engine: Ray Data with an actor pool of ONNX Runtime sessions.

Paths become a Ray dataset; ``map_batches`` sends batches to a pool of actors, each holding
one session (one GPU per actor where the cluster has GPUs, ``num_cpus`` otherwise) and
running the same decode → infer → postprocess code as the local engine. The model file
travels through the object store, so workers need not see the driver's disk; the images'
paths must be readable by the workers (shared storage, as on any cluster). Results stream
back in input order (``preserve_order``) and are committed by the same shard logic as every
engine, which is what makes a Ray run resumable and exactly-once too.

Without ``address`` a local Ray is started with ``num_cpus``; with it, an existing cluster
is joined (``ray://head:10001`` or ``auto``).
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa

from service.model.cores import cpu_count
from service.scoring.rows import Row, from_record, to_table

log = logging.getLogger(__name__)


class _ScoringActor:
    """One ONNX Runtime session per actor; called with batches of {"path": [...]}."""

    def __init__(
        self, model_ref: Any, version: str, task: str, top_k: int, batch_size: int, threads: int
    ):
        import ray

        from service.scoring.local import LocalEngine
        from service.server.config_loading import load_settings

        model_bytes = ray.get(model_ref) if isinstance(model_ref, ray.ObjectRef) else model_ref
        gpu = bool(ray.get_gpu_ids())
        settings = load_settings(
            providers=["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
            if gpu
            else ["CPUExecutionProvider"],
            intra_op_threads=threads,
            preprocess_threads=2 * threads,
        )
        # ONNX Runtime loads from a file: this actor's copy of the model's bytes, removed
        # once its sessions hold the model (each actor of each job would leave one behind).
        handle, name = tempfile.mkstemp(prefix="scoring-", suffix=".onnx")
        try:
            with os.fdopen(handle, "wb") as out:
                out.write(model_bytes)
            self.engine = LocalEngine(
                Path(name),
                task=task,
                top_k=top_k,
                batch_size=batch_size,
                settings=settings,
                version=version,
            )
        finally:
            os.unlink(name)

    def __call__(self, batch: pa.Table) -> pa.Table:
        # Arrow in and out: list columns keep their types (numpy batches would not).
        return to_table(list(self.engine.score(batch.column("path").to_pylist())))


class RayEngine:
    def __init__(
        self,
        model_path: Path,
        *,
        task: str = "classify",
        top_k: int = 5,
        batch_size: int = 32,
        address: str | None = None,
        num_cpus: int | None = None,
        actors: int | None = None,
        gpus_per_actor: float = 0.0,
    ):
        import ray

        from service.model.sessions import read_metadata
        from service.model.spec import ModelSpec
        from service.scoring.local import check_task

        spec = ModelSpec.from_metadata(read_metadata(model_path), source=str(model_path))
        check_task(spec, task)
        self.model, self.version = spec.name, Path(model_path).parent.name
        self._started_ray = False
        if not ray.is_initialized():
            if address:
                ray.init(address=address, log_to_driver=False)
            else:
                ray.init(
                    num_cpus=num_cpus or cpu_count(),
                    include_dashboard=False,
                    log_to_driver=False,
                    configure_logging=False,
                )
            self._started_ray = True
        cluster_cpus = int(ray.cluster_resources().get("CPU", 1))
        self.actors = actors or max(
            1,
            cluster_cpus
            if gpus_per_actor == 0
            else int(ray.cluster_resources().get("GPU", 1) / gpus_per_actor),
        )
        self.threads = max(1, cluster_cpus // self.actors) if gpus_per_actor == 0 else 2
        self.gpus_per_actor = gpus_per_actor
        self.model_ref = ray.put(Path(model_path).read_bytes())
        self.task, self.top_k, self.batch_size = task, min(top_k, spec.num_classes), batch_size

    def score(self, paths: list[str]) -> Iterator[Row]:
        import ray

        if not paths:
            return
        context = ray.data.DataContext.get_current()
        context.execution_options.preserve_order = True
        blocks = max(1, min(len(paths) // self.batch_size, 200))
        dataset = ray.data.from_items([{"path": p} for p in paths], override_num_blocks=blocks)
        resources: dict[str, Any] = (
            {"num_gpus": self.gpus_per_actor} if self.gpus_per_actor else {"num_cpus": self.threads}
        )
        scored = dataset.map_batches(
            _ScoringActor,
            fn_constructor_kwargs={
                "model_ref": self.model_ref,
                "version": self.version,
                "task": self.task,
                "top_k": self.top_k,
                "batch_size": self.batch_size,
                "threads": self.threads,
            },
            batch_size=self.batch_size,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=self.actors),
            **resources,
        )
        for batch in scored.iter_batches(batch_size=self.batch_size, batch_format="pyarrow"):
            table: pa.Table = batch  # batch_format="pyarrow"
            for record in table.to_pylist():
                yield from_record(record)

    def close(self) -> None:
        import ray

        if self._started_ray and ray.is_initialized():
            ray.shutdown()
