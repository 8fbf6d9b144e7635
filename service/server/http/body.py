"""The JSON bodies of the REST front door, parsed within bounds and validated before use.

A body is parsed once (the C decoder), refused if it nests deeper than ``max_json_depth``
(checked without recursion, before anything walks it), and then validated against the
Open Inference Protocol's request shape with pydantic, so that a malformed request of any
kind — a wrong type, a negative or non-integer dimension, a parameter of the wrong kind, a
``data`` array that is not numbers — is an ``InvalidArgumentError`` that names what was
wrong, and never an exception from deeper down. Tensor ``data`` is flattened without
recursion.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from service.model.errors import InvalidArgumentError


class _Part(BaseModel):
    # Unknown fields are ignored, as KServe and Triton do: clients add their own.
    model_config = ConfigDict(extra="ignore")


class RequestInput(_Part):
    name: str
    shape: list[int] = Field(description="dimensions, each >= 0")
    datatype: str
    parameters: dict[str, Any] | None = None
    data: Any = None

    def parameter(self, key: str) -> Any:
        return (self.parameters or {}).get(key)


class RequestOutput(_Part):
    name: str
    parameters: dict[str, Any] | None = None


class InferRequestBody(_Part):
    id: str | int | None = None
    parameters: dict[str, Any] | None = None
    inputs: list[RequestInput]
    outputs: list[RequestOutput] | None = None

    def parameter(self, key: str) -> Any:
        return (self.parameters or {}).get(key)


class IndexRequestBody(_Part):
    ready: bool = False


class TrafficRequestBody(_Part):
    weights: dict[str, float]


def json_depth_exceeds(value: Any, limit: int) -> bool:
    """Whether ``value`` nests lists and objects more than ``limit`` deep (no recursion;
    stops at the first path that goes too deep)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children if isinstance(child, list | dict))
    return False


def parse_json(data: bytes, max_depth: int, what: str = "the request") -> Any:
    """``data`` as JSON, refused past ``max_depth`` levels of nesting."""
    failure: InvalidArgumentError | None = None
    try:
        value = json.loads(data)
    except RecursionError:
        # The decoder gives up around a thousand levels: far past any limit.
        failure = _too_deep(max_depth, what)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        failure = InvalidArgumentError(f"{what} is not JSON: {exc}")
    if failure is not None:
        raise failure
    if json_depth_exceeds(value, max_depth):
        raise _too_deep(max_depth, what)
    return value


def _too_deep(limit: int, what: str) -> InvalidArgumentError:
    return InvalidArgumentError(
        f"{what} nests JSON arrays and objects more than {limit} levels deep, over the "
        f"limit of {limit} (max_json_depth); a tensor's data needs one level per dimension"
    )


def validated(model: type[_Part], value: Any, what: str) -> Any:
    """``value`` as ``model``, or an InvalidArgumentError listing what is wrong."""
    try:
        return model.model_validate(value)
    except ValidationError as exc:
        problems = []
        for error in exc.errors()[:5]:
            where = ".".join(str(p) for p in error["loc"]) or "body"
            problems.append(f"{where}: {error['msg']}")
        more = f" (and {exc.error_count() - 5} more)" if exc.error_count() > 5 else ""
        raise InvalidArgumentError(f"{what} is malformed: {'; '.join(problems)}{more}") from None


def flatten(data: Any) -> list[Any]:
    """A tensor's nested ``data`` lists as one flat list, row-major (no recursion)."""
    if not isinstance(data, list):
        return [data]
    out: list[Any] = []
    stack: list[Any] = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            out.append(item)
        else:
            stack.pop()
    return out
