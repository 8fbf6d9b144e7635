"""Settings: precedence (defaults < YAML < env < flags), validation messages, --help."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from service.model.cores import cpu_count
from service.server.config import Settings
from service.server.config_loading import (
    ConfigError,
    build_parser,
    load_settings,
    parse_flag_values,
)


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


def test_none_turns_a_port_off_from_a_flag_the_environment_or_yaml(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    args = build_parser().parse_args(["--http-port", "none", "--metrics-port", "None"])
    settings = load_settings(**parse_flag_values(args))
    assert (settings.http_port, settings.metrics_port) == (None, None)
    monkeypatch.setenv("CLASSIFIER_HTTP_PORT", "none")
    assert load_settings().http_port is None
    monkeypatch.delenv("CLASSIFIER_HTTP_PORT")
    config = tmp_path / "serve.yaml"
    config.write_text("metrics_port: none\nhttp_port: null\n")
    settings = load_settings(config)
    assert (settings.http_port, settings.metrics_port) == (None, None)
    assert load_settings().http_port == 8000  # nothing given: the default


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


@pytest.mark.integration  # runs `python -m service` in a subprocess
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


@pytest.mark.integration  # runs `python -m service` in a subprocess
def test_bad_flag_exits_2_with_a_message() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "service", "--max-batch-size", "zero"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    assert "max_batch_size" in out.stderr and "Traceback" not in out.stderr


def test_limits_that_cannot_work_together_are_refused_at_start(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"max_queue_size \(16\) is smaller than max_images"):
        load_settings(max_queue_size=16, max_images_per_request=64)
    with pytest.raises(ConfigError, match="max_decode_pixels"):
        load_settings(max_decode_pixels=1000, max_image_pixels=2000)
    with pytest.raises(ConfigError, match="max_inflight_bytes"):
        load_settings(max_inflight_bytes=10, max_image_bytes=20)
    assert load_settings(max_queue_size=4, max_images_per_request=4).max_queue_size == 4


def test_tls_and_token_files_are_checked(tmp_path: Path) -> None:
    cert = tmp_path / "cert.pem"
    cert.write_text("x")
    with pytest.raises(ConfigError, match="tls_cert and tls_key go together"):
        load_settings(tls_cert=cert)
    with pytest.raises(ConfigError, match=r"tls_client_ca .* needs tls_cert"):
        load_settings(tls_client_ca=cert)
    with pytest.raises(ConfigError, match=r"tls_key .* is not a readable file"):
        load_settings(tls_cert=cert, tls_key=tmp_path / "absent.key")
    with pytest.raises(ConfigError, match="auth_token_file"):
        load_settings(auth_token_file=tmp_path / "absent")
    settings = load_settings(tls_cert=cert, tls_key=cert, tls_client_ca=cert)
    assert settings.tls_client_ca == cert


@pytest.mark.integration  # runs `python -m service` in a subprocess
def test_unusable_tls_files_stop_the_server_with_a_message(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "service",
            "--port",
            "0",
            "--metrics-port",
            "none",
            "--http-port",
            "none",
            "--model-repository",
            str(tmp_path),
            "--tls-cert",
            str(garbage),
            "--tls-key",
            str(garbage),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 1
    assert "cannot use the TLS files" in out.stderr and "Traceback" not in out.stderr


def test_cpu_count_honours_a_cgroup_quota(tmp_path: Path) -> None:
    cores = len(os.sched_getaffinity(0))
    assert cpu_count(tmp_path) == cores  # no cgroup files: the affinity mask
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cpu_count(tmp_path) == cores
    (tmp_path / "cpu.max").write_text("50000 100000\n")  # half a CPU still gets one
    assert cpu_count(tmp_path) == 1
    (tmp_path / "cpu.max").write_text(f"{(cores + 8) * 100000} 100000\n")
    assert cpu_count(tmp_path) == cores  # a quota above the mask does not add cores
    (tmp_path / "cpu.max").unlink()
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")  # cgroup v1, no quota
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cpu_count(tmp_path) == cores
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("100000\n")
    assert cpu_count(tmp_path) == 1


def test_auto_workers_is_one_per_core_with_the_installed_cpu_onnxruntime() -> None:
    # The CPU wheel lists AzureExecutionProvider beside the CPU one: that is no GPU.
    import onnxruntime as ort

    from service.model.cores import cpu_count
    from service.model.runner_options import GPU_PROVIDERS

    if GPU_PROVIDERS & set(ort.get_available_providers()):
        pytest.skip("this onnxruntime has a GPU provider")
    assert load_settings().worker_count() == cpu_count()
    assert load_settings(providers=["CPUExecutionProvider"]).worker_count() == cpu_count()
    assert load_settings(workers=3).worker_count() == 3
