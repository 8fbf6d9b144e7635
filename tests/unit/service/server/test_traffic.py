"""Weighted traffic between ready versions: the split itself (shares within binomial
error), where the weights come from (the model's traffic file over the setting), what a
broken or unwritable file does, and the split through a real in-process data plane."""

from __future__ import annotations

import json
import math
import os
import random
from collections import Counter
from pathlib import Path

import pytest

from service.model.errors import InvalidArgumentError
from service.server import traffic as traffic_module
from service.server.calls import CallInfo
from service.server.config_loading import ConfigError, load_settings
from service.server.domain import ImageRequest
from service.server.traffic import TRAFFIC_FILE, TrafficSplit, checked_weights
from tests.unit.service.server.planes import MODEL, Plane, jpeg, run_scenario


def within_binomial_error(hits: int, n: int, p: float, sigmas: float = 4.0) -> bool:
    return abs(hits - n * p) <= sigmas * math.sqrt(n * p * (1 - p))


@pytest.fixture(autouse=True)
def look_every_time(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(traffic_module, "CHECK_SECONDS", 0.0)


def test_a_90_10_split_of_10000_calls_is_within_binomial_error(tmp_path: Path) -> None:
    split = TrafficSplit(tmp_path, {"m": {1: 90, 2: 10}}, random.Random(7))
    ready = {1: "v1", 2: "v2", 3: "v3"}  # 3 is ready but unweighted: it gets nothing
    picks = Counter(split.pick("m", ready) for _ in range(10_000))
    assert set(picks) == {"v1", "v2"}
    assert within_binomial_error(picks["v2"], 10_000, 0.10)


def test_only_ready_versions_share_and_none_ready_means_the_newest(tmp_path: Path) -> None:
    split = TrafficSplit(tmp_path, {"m": {1: 50, 3: 50}}, random.Random(1))
    assert {split.pick("m", {1: "v1", 2: "v2"}) for _ in range(50)} == {"v1"}  # 3 not ready
    assert split.pick("m", {2: "v2", 4: "v4"}) == "v4"  # no weighted version ready
    assert split.pick("other", {1: "v1", 2: "v2"}) == "v2"  # no weights: the newest


def test_the_traffic_file_wins_over_the_setting_and_a_broken_one_is_not_used(
    tmp_path: Path,
) -> None:
    (tmp_path / "m").mkdir()
    split = TrafficSplit(tmp_path, {"m": {1: 100}})
    assert split.weights("m") == ({1: 100.0}, "version_weights")
    path = split.publish("m", {1: 20, 2: 80})
    assert json.loads(path.read_text()) == {"weights": {"1": 20, "2": 80}}
    assert split.weights("m") == ({1: 20.0, 2: 80.0}, str(path))
    path.write_text('{"weights": {"1": -5}}')  # broken: the last good weights stay
    os.utime(path, ns=(1, 1))
    assert split.weights("m")[0] == {1: 20.0, 2: 80.0}
    path.unlink()  # gone: back to the setting
    assert split.weights("m") == ({1: 100.0}, "version_weights")


def test_weights_are_checked_and_an_unwritable_repository_is_named(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgumentError, match="not a number"):
        checked_weights({"v1": 1}, "w")
    with pytest.raises(InvalidArgumentError, match=">= 0"):
        checked_weights({"1": -1}, "w")
    with pytest.raises(InvalidArgumentError, match="above 0"):
        checked_weights({"1": 0, "2": 0}, "w")
    with pytest.raises(ConfigError, match="version_weights of demo"):
        load_settings(version_weights={"demo": {1: 0}})
    missing = TrafficSplit(tmp_path / "nowhere")
    with pytest.raises(InvalidArgumentError, match=r"cannot write .*traffic\.json"):
        missing.publish("m", {1: 1})


def test_calls_that_name_no_version_follow_the_published_split(two_versions: Path) -> None:

    async def scenario(p: Plane) -> None:
        shown = p.plane.set_traffic(CallInfo(""), MODEL, {"1": 75, "2": 25})
        assert shown.weights == {"1": 75.0, "2": 25.0}
        assert shown.source == str(two_versions / MODEL / TRAFFIC_FILE)
        assert shown.ready == ["1", "2"]
        versions: Counter[str] = Counter()
        for _ in range(200):
            answer = await p.plane.classify(
                CallInfo(""), ImageRequest(MODEL, "", [jpeg((5, 5, 5))])
            )
            versions[answer.version] += 1
        assert within_binomial_error(versions["2"], 200, 0.25)
        named = await p.plane.classify(CallInfo(""), ImageRequest(MODEL, "2", [jpeg((5, 5, 5))]))
        assert named.version == "2"  # a named version is never re-routed
        with pytest.raises(InvalidArgumentError):
            p.plane.set_traffic(CallInfo(""), MODEL, {"1": 0})

    run_scenario(two_versions, scenario, version_policy="all")
