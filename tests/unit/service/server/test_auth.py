"""Tokens: from a flag/env value and a file, several at once, rotated by rewriting the file."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from service.server import auth
from service.server.auth import TokenStore
from service.server.grpc.auth import header_of


def test_no_tokens_means_no_gate() -> None:
    assert not TokenStore().enabled


def test_the_fixed_token_and_every_token_of_the_file_are_accepted(tmp_path: Path) -> None:
    file = tmp_path / "tokens"
    file.write_text("# comment\n\n  first  \nsecond\n")
    tokens = TokenStore("fixed", file)
    assert tokens.enabled
    for token in ("fixed", "first", "second"):
        assert tokens.accepts(f"Bearer {token}")
        assert tokens.accepts(f"Bearer {token}".encode())
    for header in (None, "", "first", "Bearer", "Bearer firs", "Bearer first ", "bearer first"):
        assert not tokens.accepts(header), header
    assert not tokens.accepts("Bearer # comment")


def test_the_file_is_re_read_when_it_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(auth, "RECHECK_SECONDS", 0.0)
    file = tmp_path / "tokens"
    file.write_text("old\n")
    tokens = TokenStore(None, file)
    assert tokens.accepts("Bearer old")
    replacement = tmp_path / "tokens.new"
    replacement.write_text("old\nnew\n")
    os.replace(replacement, file)  # both during the rotation
    assert tokens.accepts("Bearer old") and tokens.accepts("Bearer new")
    file.write_text("new\n")
    assert not tokens.accepts("Bearer old") and tokens.accepts("Bearer new")
    file.unlink()  # unreadable: keep what it had rather than lock everyone out
    assert tokens.accepts("Bearer new")


def test_an_empty_file_accepts_nothing(tmp_path: Path) -> None:
    file = tmp_path / "tokens"
    file.write_text("\n")
    tokens = TokenStore(None, file)
    assert tokens.enabled and not tokens.accepts("Bearer ")


def test_a_missing_file_at_start_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        TokenStore(None, tmp_path / "absent")


def test_header_lookup() -> None:
    assert header_of([("x", "1"), ("authorization", "Bearer t")]) == "Bearer t"
    assert header_of(None) is None
