"""The gRPC engine: the same job against a running server, through the client SDK.

Requests carry ``images_per_request`` images; up to ``concurrency`` are in flight and rows
come back in input order. They go on classifier.v1 streams, one per channel (cheaper per
request than unary calls: ``python -m bench features``); a request its stream fails, and
every request after a broken stream, is sent the unary way below. The server's error
reason (trailing metadata) decides what a refusal means:

* "retry later" (``queue_full``, ``server_busy``): the same request is sent again with
  exponential backoff, for up to ``retry_seconds``; a loaded server slows the job down,
  it never turns healthy images into error rows;
* one of its images (INVALID_ARGUMENT, or a per-image limit): the request is retried
  image by image, so only the bad image becomes an error row;
* anything else — the server down after the SDK's retries, a deadline, a wrong token, a
  busy server that stays busy — stops the job: it is resumable, and error rows for healthy
  images would be wrong.
"""

from __future__ import annotations

import contextvars
import logging
import random
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Literal, TypeVar

import grpc

from service.client import (
    ClassifierClient,
    StreamFailure,
    StreamItem,
    error_reason,
    is_retryable,
    to_proto_image,
)
from service.model.layout import name_and_version
from service.model.results import Classification, Localization
from service.proto_gen.classifier.v1 import classifier_pb2 as pb
from service.scoring.rows import Row

log = logging.getLogger(__name__)
T = TypeVar("T")

# Codes that blame the request's content (one bad image), not the server.
PER_IMAGE_CODES = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED}
FIRST_BACKOFF_SECONDS = 0.1
MAX_BACKOFF_SECONDS = 5.0


def blames_the_images(exc: grpc.RpcError) -> bool:
    """A refusal caused by the request's images (not by the server being busy)."""
    return exc.code() in PER_IMAGE_CODES and not is_retryable(exc)


def with_backoff(call: Callable[[], T], retry_seconds: float) -> T:
    """``call()``, sent again after "retry later" answers, with jittered exponential
    backoff, until it gets another answer or ``retry_seconds`` have passed."""
    give_up = time.monotonic() + retry_seconds
    delay = FIRST_BACKOFF_SECONDS
    while True:
        try:
            return call()
        except grpc.RpcError as exc:
            if not is_retryable(exc) or time.monotonic() + delay > give_up:
                raise
            log.debug("server busy (%s); retrying in %.2f s", error_reason(exc), delay)
        time.sleep(delay * random.uniform(0.5, 1.0))
        delay = min(MAX_BACKOFF_SECONDS, delay * 2)


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
        certificate_chain: Path | None = None,
        private_key: Path | None = None,
        server_name: str | None = None,
        retry_seconds: float = 300.0,
        channels: int = 4,
        stream: bool = True,
    ):
        self.client = ClassifierClient(
            target,
            timeout=timeout,
            token=token,
            tls=tls,
            root_certificates=root_certificates,
            certificate_chain=certificate_chain,
            private_key=private_key,
            server_name=server_name,
            channels=channels,  # connections spread over the server's worker processes
        )
        self.retry_seconds = retry_seconds
        self.channels, self.stream = channels, stream
        name, version = name_and_version(model)
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
            if not blames_the_images(exc):
                raise
            if len(paths) == 1:
                return [Row.failed(paths[0], str(exc.details()), self.model, self.version)]
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
            if blames_the_images(exc):
                return Row.failed(path, str(exc.details()), self.model, self.version)
            raise

    def _request(self, paths: list[str], images: list[pb.Image]) -> list[Row]:
        return with_backoff(lambda: self._send(paths, images), self.retry_seconds)

    def _send(self, paths: list[str], images: list[pb.Image]) -> list[Row]:
        results: list[Classification | Localization] = list(
            self.client.localize(images, model=self.model, version=self.version, top_k=self.top_k)
            if self.task == "localize"
            else self.client.classify(
                images, model=self.model, version=self.version, top_k=self.top_k
            )
        )
        return self._rows(paths, results)

    def _rows(
        self, paths: list[str], results: Sequence[Classification | Localization]
    ) -> list[Row]:
        if len(results) != len(paths):
            raise ValueError(f"{len(paths)} images sent, {len(results)} answers")
        return [
            Row.from_predictions(
                paths[i],
                r.predictions,
                r.model,
                r.version,
                r.box if isinstance(r, Localization) else None,
                r.box_source if isinstance(r, Localization) else None,
            )
            for i, r in enumerate(results)
        ]

    def score(self, paths: list[str]) -> Iterator[Row]:
        chunks = [
            paths[i : i + self.images_per_request]
            for i in range(0, len(paths), self.images_per_request)
        ]
        if self.stream:
            done = 0
            try:
                for rows in self._streamed(chunks):
                    yield from rows
                    done += 1
                return
            except grpc.RpcError as exc:
                # A broken stream (a restart, a connection closed): what it had not
                # answered yet goes the unary way, with its backoff and its verdicts.
                log.warning(
                    "stream broken (%s); %d requests go unary", exc.code(), len(chunks) - done
                )
                chunks = chunks[done:]
        yield from self._unary(chunks)

    def _streamed(self, chunks: list[list[str]]) -> Iterator[list[Row]]:
        """Rows of each chunk, in order, over one stream per channel (so a server's worker
        processes share the job); a request the stream fails is sent again the unary way,
        which retries "retry later" answers and isolates a bad image."""
        streams = max(1, min(self.channels, len(chunks)))
        window = max(1, -(-self.concurrency // streams))

        task: Literal["classify", "localize"] = (
            "localize" if self.task == "localize" else "classify"
        )

        def items(k: int) -> Iterator[StreamItem]:
            for chunk in chunks[k::streams]:
                try:
                    images = [to_proto_image(Path(p)) for p in chunk]
                except OSError:
                    images = []  # answered as an error: the unary way sorts it out
                yield StreamItem(images, self.model, self.version, self.top_k, task=task)

        # Each stream starts on its first next(), here: in the caller's context (its
        # OpenTelemetry span, if any), which the SDK puts on the stream.
        answers = [self.client.stream(items(k), window=window) for k in range(streams)]
        try:
            for i, chunk in enumerate(chunks):
                answer = next(answers[i % streams], None)
                if answer is None or isinstance(answer, StreamFailure):
                    yield self._call(chunk)
                else:
                    yield self._rows(chunk, answer)
        finally:
            for stream in answers:
                stream.close()  # type: ignore[attr-defined]

    def _unary(self, chunks: list[list[str]]) -> Iterator[Row]:
        window: deque[Future[list[Row]]] = deque()
        with ThreadPoolExecutor(self.concurrency, thread_name_prefix="score-grpc") as pool:
            for chunk in chunks:
                # In the caller's context (its OpenTelemetry span, if any): the SDK puts
                # it on each call, so the server's spans join the caller's trace.
                context = contextvars.copy_context()
                window.append(pool.submit(context.run, self._call, chunk))
                if len(window) >= self.concurrency * 2:
                    yield from window.popleft().result()
            while window:
                yield from window.popleft().result()

    def close(self) -> None:
        self.client.close()
