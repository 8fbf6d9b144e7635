"""The benchmark workloads, built offline: real photos as JPEG, and the models to serve.

Photos: scikit-image's chelsea, coffee, astronaut and rocket at their native sizes,
encoded as JPEG quality 90 — what every contender (our server, the in-process limit, the
Triton peer) is fed. Models: the demo model from ``models/demo`` and, as a heavier second
case, a randomly initialised ResNet-50 at 224 px (speed does not depend on the weights).
"""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image

from service.model.layout import MODEL_FILE, model_file, published_versions

PHOTOS = ("chelsea", "coffee", "astronaut", "rocket")
SCRATCH = Path("bench/scratch")


def photo_bytes() -> dict[str, bytes]:
    import numpy as np
    import skimage.data

    out = {}
    for name in PHOTOS:
        buffer = io.BytesIO()
        Image.fromarray(np.asarray(getattr(skimage.data, name)())).convert("RGB").save(
            buffer, format="JPEG", quality=90
        )
        out[name] = buffer.getvalue()
    return out


def photo_folder(root: Path = SCRATCH / "photos") -> Path:
    """The photos as files (the Triton peer's load script reads a folder)."""
    root.mkdir(parents=True, exist_ok=True)
    for name, data in photo_bytes().items():
        path = root / f"{name}.jpg"
        if not path.is_file() or path.read_bytes() != data:
            path.write_bytes(data)
    return root


def load_folder(folder: Path) -> list[bytes]:
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    if not files:
        raise ValueError(f"no images in {folder}")
    return [p.read_bytes() for p in files]


def latest_model(repository: Path, name: str) -> Path:
    versions = published_versions(repository / name)
    if not versions:
        raise FileNotFoundError(
            f"no {name}/<version>/{MODEL_FILE} in {repository}; run `make demo-model` first"
        )
    return versions[max(versions)]


def resnet50_checkpoint(path: Path, data: Path = Path("data/demo")) -> Path:
    """A random-init ResNet-50 checkpoint (224 px, center crop, 10 classes): the speed of a
    network does not depend on its weights."""
    if path.is_file():
        return path
    from service.model.spec import Task
    from training.checkpoint import checkpoint_state, save_checkpoint
    from training.config import TrainConfig
    from training.models import build_model

    config = TrainConfig(
        data=data,
        backbone="resnet50",
        pretrained=False,
        input_size=224,
        output=path.parent / "resnet50-run",
    )
    model = build_model("resnet50", 10, (224, 224), with_boxes=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(
        checkpoint_state(
            model=model.state_dict(),
            epoch=0,
            config=config,
            classes=[str(d) for d in range(10)],
            task=Task.CLASSIFICATION,
            input_size=(224, 224),
            preprocessing=config.preprocessing(Task.CLASSIFICATION),
        ),
        path,
    )
    return path


def resnet50_model(
    repository: Path = SCRATCH / "models",
    data: Path = Path("data/demo"),
    precision: str = "fp32",
) -> Path:
    """The random-init ResNet-50 exported like any model of ours, as ``resnet50`` (FP32) or
    ``resnet50-fp16`` (FP16, with its accuracy gate on ``data``'s val split)."""
    name = "resnet50" if precision == "fp32" else f"resnet50-{precision}"
    target = model_file(repository, name, 1)
    if target.is_file():
        return target
    from service.model.spec import Precision
    from training.export import ExportOptions, export_checkpoint

    checkpoint = resnet50_checkpoint(repository.parent / "resnet50-random.pt", data)
    export_checkpoint(
        checkpoint,
        ExportOptions(
            repository=repository,
            name=name,
            version=1,
            data=data,
            parity_images=8,
            precision=Precision(precision),
        ),
    )
    return target
