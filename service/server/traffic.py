"""Weighted traffic between the ready versions of a model, for calls that name no version
(a gradual rollout, as KServe's ``canaryTrafficPercent``): version 2 at weight 10 and
version 1 at 90 get about one call in ten and nine in ten.

Where the weights come from, the first found winning:

1. ``<repository>/<model>/traffic.json`` — ``{"weights": {"1": 90, "2": 10}}`` — published
   into the repository like a version (or written by ``PUT /v2/repository/models/{m}/traffic``).
   Every worker process looks at the file at most once a second, so a change reaches them
   all without a restart, and it survives restarts and version reloads;
2. the ``version_weights`` setting, ``{demo: {1: 90, 2: 10}}``;
3. none: the newest ready version takes every call (the default).

Only ready versions share the traffic, in proportion to their weights; a version that is
retired, failed or still loading gets no new calls, and when no weighted version is ready
the newest ready version answers. A call that names a version always gets that version.
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from service.model.errors import InvalidArgumentError

log = logging.getLogger(__name__)

TRAFFIC_FILE = "traffic.json"
# How often a worker looks at a model's traffic file (one stat() call).
CHECK_SECONDS = 1.0


def checked_weights(weights: Mapping[Any, Any], where: str) -> dict[int, float]:
    """``{version: weight}`` with whole-number versions and weights >= 0, one > 0."""
    out: dict[int, float] = {}
    for version, weight in weights.items():
        if not str(version).isdigit():
            raise InvalidArgumentError(f"{where}: version {version!r} is not a number")
        if isinstance(weight, bool) or not isinstance(weight, int | float) or weight < 0:
            raise InvalidArgumentError(f"{where}: the weight of version {version} must be >= 0")
        out[int(version)] = float(weight)
    if not any(w > 0 for w in out.values()):
        raise InvalidArgumentError(f"{where}: at least one version needs a weight above 0")
    return out


@dataclass
class _FileWeights:
    checked: float = -1e18  # time.monotonic() of the last look
    stamp: tuple[int, int] | None = None  # (mtime_ns, size) of what was read
    weights: dict[int, float] | None = None


@dataclass
class TrafficSplit:
    root: Path
    configured: dict[str, dict[int, float]] = field(default_factory=dict)
    rng: random.Random = field(default_factory=random.Random)
    _files: dict[str, _FileWeights] = field(default_factory=dict)

    def weights(self, name: str) -> tuple[dict[int, float], str]:
        """The model's weights and where they come from (file, setting, or none)."""
        from_file = self._from_file(name)
        if from_file is not None:
            return from_file, str(self.root / name / TRAFFIC_FILE)
        if name in self.configured:
            return self.configured[name], "version_weights"
        return {}, "none: the newest ready version"

    def pick(self, name: str, ready: Mapping[int, Any]) -> Any:
        """The ready version a call that names none goes to."""
        # Per call: the weights only, not ``weights()``'s description of their source.
        weights = self._from_file(name)
        if weights is None:
            weights = self.configured.get(name)
        if weights:
            shares = [(v, w) for v, w in weights.items() if w > 0 and v in ready]
            if len(shares) == 1:
                return ready[shares[0][0]]
            if shares:
                versions, ws = zip(*shares, strict=True)
                return ready[self.rng.choices(versions, weights=ws)[0]]
        return ready[max(ready)]

    def publish(self, name: str, weights: dict[int, float]) -> Path:
        """Write the model's traffic file (atomically: readers see the old or the new)."""
        path = self.root / name / TRAFFIC_FILE
        temporary = path.with_name(f".{TRAFFIC_FILE}.{os.getpid()}")
        body = {"weights": {str(v): w for v, w in sorted(weights.items())}}
        try:
            temporary.write_text(json.dumps(body) + "\n")
            os.replace(temporary, path)
        except OSError as exc:
            temporary.unlink(missing_ok=True)
            raise InvalidArgumentError(
                f"cannot write {path} ({exc.strerror}): with a read-only repository, publish "
                "the file into it, or set version_weights"
            ) from None
        self._files.pop(name, None)  # read it again on the next call
        return path

    def withdraw(self, name: str) -> None:
        """Remove the model's traffic file: back to the setting (or the newest version)."""
        path = self.root / name / TRAFFIC_FILE
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            raise InvalidArgumentError(f"cannot remove {path} ({exc.strerror})") from None
        self._files.pop(name, None)

    def _from_file(self, name: str) -> dict[int, float] | None:
        state = self._files.setdefault(name, _FileWeights())
        now = time.monotonic()
        if now - state.checked < CHECK_SECONDS:
            return state.weights
        state.checked = now
        path = self.root / name / TRAFFIC_FILE
        try:
            info = path.stat()
        except OSError:
            state.stamp = state.weights = None
            return None
        stamp = (info.st_mtime_ns, info.st_size)
        if stamp != state.stamp:
            state.stamp = stamp
            try:
                body = json.loads(path.read_text())
                state.weights = checked_weights(body["weights"], str(path))
                log.info("model %s: traffic weights %s from %s", name, state.weights, path)
            except (
                OSError,
                ValueError,
                KeyError,
                TypeError,
                AttributeError,
                InvalidArgumentError,
            ) as exc:
                # A broken file leaves the last good weights in place, and says so once.
                log.error("model %s: %s is not used: %s", name, path, exc)
        return state.weights
