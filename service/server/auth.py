"""Bearer tokens: where they come from and how they are checked (the envelope,
``service.server.calls``, asks; the gRPC gate and the HTTP envelope refuse).

Tokens come from ``auth_token`` (an environment variable or a flag) and from
``auth_token_file`` (one token per line; ``#`` comments and blank lines ignored), which is
re-read when it changes, so a token can be rotated without a restart: add the new one,
move the clients, remove the old one. Every accepted token is compared in constant time,
and all of them are compared, so timing tells nothing about which came close.

``service.server.grpc.auth`` enforces them on every RPC except health (``grpc.health.v1.Health``
and the Open Inference Protocol's ServerLive/ServerReady: probes carry no credentials);
it is installed only when tokens are configured, so a server without them pays nothing
per call.
"""

from __future__ import annotations

import hmac
import logging
import time
from pathlib import Path

log = logging.getLogger(__name__)

AUTH_HEADER = "authorization"
# How often the token file's modification time is looked at (one stat per interval).
RECHECK_SECONDS = 1.0


def _parse(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


class TokenStore:
    """The accepted tokens. ``enabled`` is False when none are configured."""

    def __init__(self, token: str | None = None, token_file: Path | None = None):
        self._fixed = [token] if token else []
        self._file = token_file
        self._file_state: tuple[int, int, int] | None = None
        self._next_check = 0.0
        self._expected: tuple[bytes, ...] = ()
        self.enabled = bool(self._fixed) or token_file is not None
        self._reload(initial=True)

    def _reload(self, initial: bool = False) -> None:
        tokens = list(self._fixed)
        if self._file is not None:
            try:
                st = self._file.stat()
                state = (st.st_mtime_ns, st.st_size, st.st_ino)
                if state == self._file_state and not initial:
                    return
                from_file = _parse(self._file.read_text())
            except OSError as exc:
                if initial:
                    raise
                log.error("cannot re-read %s (keeping the tokens it had): %s", self._file, exc)
                return
            self._file_state = state
            tokens += from_file
            if not initial:
                log.info("reloaded %d token(s) from %s", len(from_file), self._file)
        self._expected = tuple(f"Bearer {t}".encode() for t in tokens)

    def accepts(self, header: str | bytes | None) -> bool:
        """Whether an ``authorization`` header value carries an accepted token."""
        if self._file is not None and time.monotonic() >= self._next_check:
            self._next_check = time.monotonic() + RECHECK_SECONDS
            self._reload()
        if header is None:
            return False
        got = header.encode() if isinstance(header, str) else bytes(header)
        ok = False
        for expected in self._expected:  # no early exit: compare against every token
            ok |= hmac.compare_digest(got, expected)
        return ok
