"""The gRPC scoring engine's reading of refusals: busy → back off and resend; bad image →
error row; anything else → stop."""

from __future__ import annotations

import grpc
import pytest

from service.model.errors import REASON_KEY
from service.scoring.grpc_engine import blames_the_images, with_backoff


class Refusal(grpc.RpcError):
    """What a refused unary call raises: a code, details and trailing metadata."""

    def __init__(self, code: grpc.StatusCode, reason: str | None):
        self._code, self._reason = code, reason

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return f"refused: {self._reason}"

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        return ((REASON_KEY, self._reason),) if self._reason else ()


QUEUE_FULL = Refusal(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue_full")
TOO_BIG = Refusal(grpc.StatusCode.RESOURCE_EXHAUSTED, "limit")


def test_what_blames_the_images() -> None:
    assert blames_the_images(TOO_BIG)
    assert blames_the_images(Refusal(grpc.StatusCode.INVALID_ARGUMENT, "invalid_image"))
    assert not blames_the_images(QUEUE_FULL)
    assert not blames_the_images(Refusal(grpc.StatusCode.RESOURCE_EXHAUSTED, "server_busy"))
    assert not blames_the_images(Refusal(grpc.StatusCode.UNAUTHENTICATED, "unauthenticated"))
    # An older server without reasons: RESOURCE_EXHAUSTED is read as the request's fault.
    assert blames_the_images(Refusal(grpc.StatusCode.RESOURCE_EXHAUSTED, None))


def test_busy_answers_are_retried_with_growing_waits(monkeypatch: pytest.MonkeyPatch) -> None:
    waits: list[float] = []
    monkeypatch.setattr("service.scoring.grpc_engine.time.sleep", waits.append)
    answers: list[object] = [QUEUE_FULL, QUEUE_FULL, QUEUE_FULL, "rows"]

    def call() -> object:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    assert with_backoff(call, retry_seconds=60) == "rows"
    assert len(waits) == 3 and waits[0] < waits[2]  # exponential (jittered) backoff


def test_other_refusals_are_not_retried_and_busy_ones_give_up_in_time() -> None:
    calls = []

    def refuse(error: grpc.RpcError) -> object:
        calls.append(1)
        raise error

    with pytest.raises(grpc.RpcError):
        with_backoff(lambda: refuse(TOO_BIG), retry_seconds=60)
    assert len(calls) == 1
    with pytest.raises(grpc.RpcError):
        with_backoff(lambda: refuse(QUEUE_FULL), retry_seconds=0.3)  # real sleeps, briefly
    assert 2 <= len(calls) <= 5
