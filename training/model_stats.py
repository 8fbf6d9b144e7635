"""What a model costs: parameters, multiply-adds per image, ONNX Runtime speed on this machine.

Parameters and multiply-adds count the served graph: the trunk and the heads that are
exported (Inception's training-only auxiliary classifier is left out). Multiply-adds come
from PyTorch's own FLOP counter (``torch.utils.flop_counter``: convolutions and matrix
products, which are nearly all of a CNN's work), halved, as papers quote "mult-adds".
Speed is measured on the exported file through the serving runner, as served.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from service.model.cores import cpu_count
from training.models import ImageModel
from training.quantize import measure_latency

THROUGHPUT_BATCHES = (1, 8, 32)


def served_parameters(model: ImageModel) -> int:
    aux = {id(p) for p in model.aux_head.parameters()} if model.aux_head is not None else set()
    return sum(p.numel() for p in model.parameters() if id(p) not in aux)


def multiply_adds(model: ImageModel) -> int:
    """Multiply-adds of one forward pass on one image at the model's input size."""
    model.eval()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(torch.zeros(1, 3, *model.input_size))
    return int(counter.get_total_flops() // 2)


@dataclass(frozen=True)
class Speed:
    latency_ms: float  # median, batch 1
    throughput: float  # images/s at ``best_batch``
    best_batch: int
    threads: int


def onnx_speed(path: Path, input_hw: tuple[int, int], repeats: int = 20) -> Speed:
    """Batch-1 latency and the best throughput over ``THROUGHPUT_BATCHES``, with every core
    this process may use as ONNX Runtime intra-op threads."""
    threads = cpu_count()
    per_batch = {
        b: measure_latency(path, input_hw, b, threads, repeats) for b in THROUGHPUT_BATCHES
    }
    best = max(per_batch, key=lambda b: b / per_batch[b])
    return Speed(
        latency_ms=per_batch[1] * 1000,
        throughput=best / per_batch[best],
        best_batch=best,
        threads=threads,
    )
