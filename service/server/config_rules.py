"""The rules between settings: checks that tie fields together (each message names the
fields and their values), and what ``workers: 0`` ("auto") resolves to on this machine."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from service.model.cores import cpu_count
from service.model.errors import InvalidArgumentError
from service.model.runner_options import GPU_PROVIDERS
from service.server.traffic import checked_weights

if TYPE_CHECKING:
    from service.server.config import Settings


def check_consistent(settings: Settings) -> None:
    """Raise ValueError naming the first pair of fields that cannot go together."""
    too_big = [v for v in settings.preferred_batch_sizes if v > settings.max_batch_size]
    if too_big:
        raise ValueError(
            f"preferred_batch_sizes {too_big} exceed max_batch_size {settings.max_batch_size}"
        )
    if settings.version_policy == "specific" and not settings.versions:
        raise ValueError("version_policy 'specific' needs versions, e.g. {demo: [1, 2]}")
    if settings.max_image_bytes > settings.max_receive_message_bytes:
        raise ValueError(
            f"max_image_bytes ({settings.max_image_bytes}) exceeds "
            f"max_receive_message_bytes ({settings.max_receive_message_bytes})"
        )
    if settings.max_queue_size < settings.max_images_per_request:
        # Otherwise a request of max_images_per_request images could never be admitted
        # and would be told "retry later" forever.
        raise ValueError(
            f"max_queue_size ({settings.max_queue_size}) is smaller than "
            f"max_images_per_request ({settings.max_images_per_request})"
        )
    if settings.max_decode_pixels < settings.max_image_pixels:
        raise ValueError(
            f"max_decode_pixels ({settings.max_decode_pixels:,}) is smaller than "
            f"max_image_pixels ({settings.max_image_pixels:,}): the largest allowed image "
            "could never be decoded"
        )
    if settings.max_inflight_bytes < settings.max_image_bytes:
        raise ValueError(
            f"max_inflight_bytes ({settings.max_inflight_bytes:,}) is smaller than "
            f"max_image_bytes ({settings.max_image_bytes:,})"
        )
    if (settings.tls_cert is None) != (settings.tls_key is None):
        raise ValueError("tls_cert and tls_key go together: give both or neither")
    if settings.tls_client_ca is not None and settings.tls_cert is None:
        raise ValueError("tls_client_ca (mTLS) needs tls_cert and tls_key")
    for model, weights in settings.version_weights.items():
        try:
            checked_weights(weights, f"version_weights of {model}")
        except InvalidArgumentError as exc:
            raise ValueError(exc.message) from None
    for name in ("tls_cert", "tls_key", "tls_client_ca", "auth_token_file"):
        path = getattr(settings, name)
        if path is not None and not Path(path).is_file():
            raise ValueError(f"{name} {path} is not a readable file")


def auto_worker_count(providers: list[str]) -> int:
    """One worker per core on CPU. With a GPU provider first (and a GPU to use), one:
    every worker would hold its own CUDA context and engines (hundreds of MB of device
    memory each) and split the GPU's batches, and one process already feeds a GPU far
    faster than it decodes JPEGs on these few cores (unmeasured here: no GPU)."""
    if providers[0] in GPU_PROVIDERS and gpu_available():
        return 1
    return cpu_count()


def gpu_available() -> bool:
    """A GPU execution provider in this onnxruntime build and a GPU it may use. Other
    providers do not count: the CPU wheel from PyPI lists AzureExecutionProvider."""
    from service.model.cuda import gpu_present
    from service.model.sessions import available_providers

    return bool(GPU_PROVIDERS & set(available_providers())) and gpu_present()
