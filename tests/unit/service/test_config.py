"""Settings: precedence (defaults < YAML < env < flags), validation messages, --help."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from service.config import ConfigError, Settings, build_parser, load_settings, parse_flag_values


def test_precedence_yaml_then_env_then_flags(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "serve.yaml"
    config.write_text(
        "max_batch_size: 8\nmax_queue_delay_us: 100\nport: 1234\npreferred_batch_sizes: [2, 4]\n"
    )
    monkeypatch.setenv("CLASSIFIER_MAX_QUEUE_DELAY_US", "200")
    monkeypatch.setenv("CLASSIFIER_PORT", "2345")
    args = build_parser().parse_args(["--port", "3456", "--models", "a,b"])
    settings = load_settings(config, **parse_flag_values(args))
    assert settings.max_batch_size == 8  # YAML
    assert settings.max_queue_delay_us == 200  # env beats YAML
    assert settings.port == 3456  # flag beats env
    assert settings.preferred_batch_sizes == [2, 4]
    assert settings.models == ["a", "b"]


def test_every_bad_field_is_named(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("max_batch_size: 0\nport: 99999\nversion_policy: newest\n")
    with pytest.raises(ConfigError) as info:
        load_settings(config)
    message = str(info.value)
    for field in ("max_batch_size", "port", "version_policy"):
        assert field in message


def test_cross_field_rules() -> None:
    with pytest.raises(ConfigError, match="exceed max_batch_size"):
        load_settings(max_batch_size=4, preferred_batch_sizes=[8])
    with pytest.raises(ConfigError, match="needs versions"):
        load_settings(version_policy="specific")
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(Path("/nonexistent.yaml"))


def test_help_documents_every_setting() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "service", "--help"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    for name in Settings.model_fields:
        assert "--" + name.replace("_", "-") in out, name


def test_bad_flag_exits_2_with_a_message() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "service", "--max-batch-size", "zero"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    assert "max_batch_size" in out.stderr and "Traceback" not in out.stderr
