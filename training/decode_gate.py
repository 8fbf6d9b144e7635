"""The export's gate for ``decode: jpeg_draft``: does decoding JPEGs at a reduced DCT
scale change this model's answers?

A model trained with ``jpeg_draft: true`` is evaluated, and served, on JPEGs that libjpeg
decoded at 1/2, 1/4 or 1/8 scale (the smallest that still covers the resize target).
That is cheaper than decoding every pixel, and it costs nothing in accuracy only if the
model does not care. This module measures it on the labelled split: the model's top-1 on
each image with the draft decode and with the full decode, through the serving
preprocessing. The export keeps ``jpeg_draft`` only when the two agree on at least
``min_agreement`` of the images and top-1 moves by at most ``max_top1_change``; otherwise
it writes ``decode: full`` and says so.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from service.model.image_header import UNLIMITED
from service.model.preprocess import decode_for_model, preprocess_encoded
from service.model.runner import Runner
from service.model.runner_options import CPU, RunnerOptions
from service.model.spec import DecodeMode, ModelSpec
from training.data import load_dataset


@dataclass(frozen=True)
class DecodeGate:
    images: int
    drafted: int  # images whose draft decode was smaller than the full one
    agreement: float  # fraction of images with the same top-1 class both ways
    top1_draft: float
    top1_full: float
    min_agreement: float
    max_top1_change: float

    @property
    def top1_change(self) -> float:
        return abs(self.top1_draft - self.top1_full)

    @property
    def passed(self) -> bool:
        return self.agreement >= self.min_agreement and self.top1_change <= self.max_top1_change

    def metrics(self) -> dict[str, float]:
        """What the ModelSpec records, so a user can see the gate's evidence."""
        return {
            "decode_gate_images": float(self.images),
            "decode_gate_drafted": float(self.drafted),
            "decode_gate_agreement": round(self.agreement, 4),
            "decode_gate_top1_change": round(self.top1_change, 4),
        }


def with_decode(spec: ModelSpec, mode: DecodeMode) -> ModelSpec:
    prep = spec.preprocessing.model_copy(update={"decode": mode})
    return spec.model_copy(update={"preprocessing": prep})


def measure_decode_gate(
    model_path: Path,
    data: Path,
    *,
    split: str = "val",
    min_agreement: float = 0.995,
    max_top1_change: float = 0.002,
    batch_size: int = 64,
) -> DecodeGate:
    """Top-1 with the draft decode against the full decode, on ``split`` of ``data``."""
    runner = Runner(model_path, RunnerOptions(providers=[CPU]))
    draft_spec = with_decode(runner.spec, DecodeMode.JPEG_DRAFT)
    full_spec = with_decode(runner.spec, DecodeMode.FULL)
    samples = load_dataset(data, splits=(split,), classes=runner.spec.labels).splits[split].samples
    if not samples:
        raise ValueError(f"{data} has no {split} images to measure the decode gate on")
    labels = np.array([s.label for s in samples])
    answers: dict[DecodeMode, list[np.ndarray]] = {DecodeMode.JPEG_DRAFT: [], DecodeMode.FULL: []}
    drafted = 0
    for start in range(0, len(samples), batch_size):
        payloads = [s.path.read_bytes() for s in samples[start : start + batch_size]]
        drafted += sum(_is_drafted(p, draft_spec) for p in payloads)
        for spec in (draft_spec, full_spec):
            batch = np.stack([_input(p, spec) for p in payloads])
            top1 = runner.run(batch)[spec.outputs.probabilities].argmax(1)
            answers[spec.preprocessing.decode].append(top1)
    draft = np.concatenate(answers[DecodeMode.JPEG_DRAFT])
    full = np.concatenate(answers[DecodeMode.FULL])
    return DecodeGate(
        images=len(samples),
        drafted=drafted,
        agreement=float((draft == full).mean()),
        top1_draft=float((draft == labels).mean()),
        top1_full=float((full == labels).mean()),
        min_agreement=min_agreement,
        max_top1_change=max_top1_change,
    )


def _input(payload: bytes, spec: ModelSpec) -> np.ndarray:
    # UNLIMITED: a labelled dataset may hold images over the serving limits; the gate is
    # about the decode, not about which images serving would refuse.
    pixels, _ = preprocess_encoded(payload, spec, UNLIMITED)
    return pixels


def _is_drafted(payload: bytes, spec: ModelSpec) -> bool:
    """Whether the draft decode of ``payload`` has fewer pixels than its header says."""
    h, w = spec.input.height, spec.input.width
    with Image.open(io.BytesIO(payload)) as header:
        width, height = header.size
    with decode_for_model(payload, spec.preprocessing, h, w, UNLIMITED) as reduced:
        return reduced.width * reduced.height < width * height
