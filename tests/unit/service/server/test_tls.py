"""Server certificates follow their files: a new pair is loaded for the next connection,
a broken one is refused and the last good one kept."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from service.server.tls import ServerCertificates
from tests.certs import Authority


def put(source: Path, target: Path) -> None:
    shutil.copy(source, target.with_suffix(".tmp"))
    os.replace(target.with_suffix(".tmp"), target)


def test_fetch_reloads_only_changed_files_and_keeps_the_last_good_pair(tmp_path: Path) -> None:
    ca = Authority.create("ca")
    cert, key = tmp_path / "live.pem", tmp_path / "live.key"
    first = ca.issue(tmp_path, "first", server=True)
    put(first[0], cert)
    put(first[1], key)
    certificates = ServerCertificates(cert, key, ca.write(tmp_path))
    certificates.credentials()
    assert certificates.fetch() is None  # unchanged: gRPC keeps its configuration

    second = ca.issue(tmp_path, "second", server=True)
    put(second[1], key)  # key first: for a moment the pair does not match
    assert certificates.fetch() is None
    assert certificates.fetch() is None  # the broken state is not retried per connection
    put(second[0], cert)
    assert certificates.fetch() is not None  # the new pair
    assert certificates.fetch() is None


def test_unusable_files_fail_at_start(tmp_path: Path) -> None:
    ca = Authority.create("ca")
    cert, _ = ca.issue(tmp_path, "a", server=True)
    _, other_key = ca.issue(tmp_path, "b", server=True)
    with pytest.raises(ValueError, match="cannot use the TLS files"):
        ServerCertificates(cert, other_key).credentials()
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate")
    with pytest.raises(ValueError, match="cannot use the TLS files"):
        ServerCertificates(garbage, other_key).credentials()
