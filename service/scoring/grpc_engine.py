"""The gRPC engine: the same job against a running server, through the client SDK.

Requests carry ``images_per_request`` images; up to ``concurrency`` are in flight and rows
come back in input order. A request refused because of one of its images (INVALID_ARGUMENT
or a per-image limit) is retried image by image, so only the bad image becomes an error
row. Anything else — the server down after the SDK's retries, a deadline, a wrong token —
stops the job: it is resumable, and error rows for healthy images would be wrong.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import grpc

from service.client import ClassifierClient, predictions_from_proto, to_proto_image
from service.proto_gen.classifier.v1 import classifier_pb2 as pb
from service.results import Box
from service.scoring.rows import Row

# Codes that blame the request's content (one bad image), not the server.
PER_IMAGE_CODES = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED}


def parse_model(model: str) -> tuple[str, str]:
    """``models/demo/3``, ``demo/3`` → ("demo", "3"); ``models/demo``, ``demo`` → ("demo", "")."""
    parts = Path(model).parts
    if parts and parts[-1] == "model.onnx":
        parts = parts[:-1]
    if len(parts) >= 2 and parts[-1].isdigit():
        return parts[-2], parts[-1]
    return parts[-1], ""


class GrpcEngine:
    def __init__(
        self,
        target: str,
        model: str,
        *,
        task: str = "classify",
        top_k: int = 5,
        images_per_request: int = 16,
        concurrency: int = 8,
        timeout: float = 120.0,
        token: str | None = None,
        tls: bool = False,
        root_certificates: Path | None = None,
    ):
        self.client = ClassifierClient(
            target, timeout=timeout, token=token, tls=tls, root_certificates=root_certificates
        )
        name, version = parse_model(model)
        info = self.client.get_model(name, version)  # fails fast on a wrong model
        if task == "localize" and not (info.has_boxes or info.has_cam):
            raise ValueError(f"model {name} cannot localize: no box head and no CAM outputs")
        self.model, self.version = info.name, info.version
        self.task, self.top_k = task, top_k
        self.images_per_request, self.concurrency = images_per_request, concurrency
        self.timeout = timeout

    def _call(self, paths: list[str]) -> list[Row]:
        try:
            images = [to_proto_image(Path(p)) for p in paths]
        except OSError:
            return [self._one(p) for p in paths]
        try:
            return self._request(paths, images)
        except grpc.RpcError as exc:
            if exc.code() not in PER_IMAGE_CODES or len(paths) == 1:
                raise
            return [self._one(p) for p in paths]  # isolate the image(s) at fault

    def _one(self, path: str) -> Row:
        try:
            image = to_proto_image(Path(path))
        except OSError as exc:
            return Row.failed(
                path, f"cannot read {path}: {exc.strerror or exc}", self.model, self.version
            )
        try:
            return self._request([path], [image])[0]
        except grpc.RpcError as exc:
            if exc.code() in PER_IMAGE_CODES:
                return Row.failed(path, str(exc.details()), self.model, self.version)
            raise

    def _request(self, paths: list[str], images: list[pb.Image]) -> list[Row]:
        stub, meta = self.client.stub, self.client.metadata
        if self.task == "localize":
            response = stub.Localize(
                pb.LocalizeRequest(
                    model=self.model, version=self.version, images=images, top_k=self.top_k
                ),
                timeout=self.timeout,
                metadata=meta,
            )
            return [
                Row.from_predictions(
                    p,
                    predictions_from_proto(r.predictions),
                    response.model,
                    response.version,
                    Box(r.box.x_min, r.box.y_min, r.box.x_max, r.box.y_max, r.box.score),
                    r.box_source,
                )
                for p, r in zip(paths, response.results, strict=True)
            ]
        response = stub.Classify(
            pb.ClassifyRequest(
                model=self.model, version=self.version, images=images, top_k=self.top_k
            ),
            timeout=self.timeout,
            metadata=meta,
        )
        return [
            Row.from_predictions(
                p, predictions_from_proto(r.predictions), response.model, response.version
            )
            for p, r in zip(paths, response.results, strict=True)
        ]

    def score(self, paths: list[str]) -> Iterator[Row]:
        chunks = [
            paths[i : i + self.images_per_request]
            for i in range(0, len(paths), self.images_per_request)
        ]
        window: deque[Future[list[Row]]] = deque()
        with ThreadPoolExecutor(self.concurrency, thread_name_prefix="score-grpc") as pool:
            for chunk in chunks:
                window.append(pool.submit(self._call, chunk))
                if len(window) >= self.concurrency * 2:
                    yield from window.popleft().result()
            while window:
                yield from window.popleft().result()

    def close(self) -> None:
        self.client.close()
