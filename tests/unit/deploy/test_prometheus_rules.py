"""The Prometheus config and alert rules, checked by Prometheus's own tool (promtool).

CI installs Debian's ``prometheus`` package for promtool (.ci/run); elsewhere these tests
skip, saying so, when promtool is not on PATH.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
PROMTOOL = shutil.which("promtool")
pytestmark = pytest.mark.skipif(PROMTOOL is None, reason="promtool (Debian: prometheus) not found")


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=60)


def test_the_config_and_its_rules_load_as_compose_mounts_them(tmp_path: Path) -> None:
    # docker-compose.yml mounts both files into /etc/prometheus/ under these names.
    shutil.copy(ROOT / "deploy/prometheus.yml", tmp_path / "prometheus.yml")
    shutil.copy(ROOT / "deploy/prometheus-rules.yml", tmp_path / "rules.yml")
    out = promtool("check", "config", str(tmp_path / "prometheus.yml"))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "1 rule files found" in out.stdout


def test_the_alert_rules_pass_their_unit_tests() -> None:
    out = promtool("test", "rules", str(ROOT / "deploy/prometheus-rules.test.yml"))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout


def test_every_alert_has_a_unit_test() -> None:
    import yaml

    rules = yaml.safe_load((ROOT / "deploy/prometheus-rules.yml").read_text())
    alerts = {r["alert"] for group in rules["groups"] for r in group["rules"] if "alert" in r}
    tests = yaml.safe_load((ROOT / "deploy/prometheus-rules.test.yml").read_text())
    tested = {
        case["alertname"] for test in tests["tests"] for case in test.get("alert_rule_test", [])
    }
    assert alerts <= tested, alerts - tested
