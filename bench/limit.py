"""The in-process limit: what this machine can do with our pipeline and no gRPC at all.

Same code as the server — ``service.model.preprocess`` decoding in a thread pool while
``service.model.runner`` runs the previous batch, then top-k — with the server's thread
settings. Throughput is taken at several batch sizes and the best is reported; batch-1
latency is one image at a time, decode to top-k, nothing overlapping.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from service.model.gpu_decode import device_preprocessor_for
from service.model.offline import run_pipeline
from service.model.postprocess import top_k
from service.model.preprocess import preprocess_encoded
from service.model.runner import Runner
from service.server.config import Settings
from service.server.config_loading import load_settings


@dataclass
class LimitResult:
    images_per_s_by_batch: dict[int, float]
    best_batch: int
    best_images_per_s: float
    batch1_latency_ms: dict[str, float]
    # CPU (this process, all threads) per image at each batch size, and at the best one.
    cpu_ms_per_image_by_batch: dict[int, float]
    cpu_ms_per_image: float
    decode: str = "cpu"  # where JPEGs were decoded: cpu, or gpu (nvImageCodec)

    def summary(self) -> str:
        lat = self.batch1_latency_ms
        return (
            f"limit: {self.best_images_per_s:.1f} img/s at batch {self.best_batch}, "
            f"cpu {self.cpu_ms_per_image:.2f} ms/img; "
            f"batch-1 latency p50 {lat['p50']:.2f} ms p99 {lat['p99']:.2f} ms"
        )

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def measure_limit(
    model: Path,
    images: list[bytes],
    *,
    batch_sizes: tuple[int, ...] = (1, 8, 16, 32),
    seconds: float = 5.0,
    latency_samples: int = 200,
    settings: Settings | None = None,
) -> LimitResult:
    """``settings``: the server's (default: its defaults), for the same thread counts."""
    settings = settings or load_settings()
    decode_threads = settings.decode_threads
    runner = Runner(model, settings.runner_options())
    spec = runner.spec
    labels = spec.labels
    runner.warmup(sorted(set(batch_sizes)))
    limits = settings.image_limits()
    # As the server does: JPEGs decoded on the GPU when the model runs there (decode_device).
    runner.device_preprocessor = device_preprocessor_for(
        runner, settings.decode_device, limits, settings.gpu_decoders
    )
    throughput: dict[int, float] = {}
    cpu_ms: dict[int, float] = {}
    for batch in batch_sizes:
        count = 0
        started = time.perf_counter()
        cpu_started = time.process_time()
        while time.perf_counter() - started < seconds:
            stream = (images[i % len(images)] for i in range(batch * 8))
            for outcome in run_pipeline(
                runner, stream, batch_size=batch, limits=limits, decode_threads=decode_threads
            ):
                assert outcome.outputs is not None, outcome.error
                top_k(outcome.outputs[spec.outputs.probabilities], 5, labels)
                count += 1
        throughput[batch] = count / (time.perf_counter() - started)
        cpu_ms[batch] = (time.process_time() - cpu_started) * 1000 / count
    latencies = []
    device = runner.device_preprocessor
    for i in range(latency_samples):
        started = time.perf_counter()
        image = images[i % len(images)]
        on_device = device.prepare([image], limits)[0] if device is not None else None
        if isinstance(on_device, tuple):
            out = runner.run_items([on_device[0]])
        else:
            array, _ = preprocess_encoded(image, spec, limits)
            out = runner.run(array[None])
        top_k(out[spec.outputs.probabilities][0], 5, labels)
        latencies.append(time.perf_counter() - started)
    ms = np.array(latencies) * 1000
    best = max(throughput, key=lambda b: throughput[b])
    return LimitResult(
        images_per_s_by_batch={b: round(v, 1) for b, v in throughput.items()},
        best_batch=best,
        best_images_per_s=throughput[best],
        cpu_ms_per_image_by_batch={b: round(v, 3) for b, v in cpu_ms.items()},
        cpu_ms_per_image=round(cpu_ms[best], 3),
        decode="cpu" if device is None else "gpu",
        batch1_latency_ms={
            "p50": float(np.percentile(ms, 50)),
            "p90": float(np.percentile(ms, 90)),
            "p99": float(np.percentile(ms, 99)),
            "mean": float(ms.mean()),
        },
    )
