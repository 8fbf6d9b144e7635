"""TLS and mTLS for the server, from PEM files that are re-read when they change.

The gRPC port: gRPC calls ``fetch`` before every new connection's handshake (its dynamic server
certificate configuration). We look at the files' size, mtime and inode there — three
``stat`` calls — and load them again only when one changed, so a certificate rotated on
disk (cert-manager, a renewed Let's Encrypt certificate) serves the next connection
without a restart. A new pair that does not load (the key written before its certificate,
a typo) is logged and the previous one kept until the files change again. The HTTP port:
an ``ssl.SSLContext`` that ``refresh`` reloads in place when the files change.
"""

from __future__ import annotations

import logging
import os
import ssl
from pathlib import Path

import grpc

log = logging.getLogger(__name__)

FileState = tuple[tuple[int, int, int] | None, ...]


def _state(paths: list[Path]) -> FileState:
    out: list[tuple[int, int, int] | None] = []
    for path in paths:
        try:
            st = os.stat(path)
            out.append((st.st_size, st.st_mtime_ns, st.st_ino))
        except OSError:
            out.append(None)
    return tuple(out)


def check_server_files(cert: Path, key: Path, client_ca: Path | None = None) -> None:
    """Raise ValueError, naming the files, unless they make a usable server certificate
    (and client CA). Plain ``ssl``: the supervisor checks before it forks its workers."""
    paths = [cert, key] + ([client_ca] if client_ca else [])
    try:
        # Raises if the key does not belong to the certificate, or either is malformed.
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert, key)
        if client_ca is not None:
            ssl.create_default_context(cadata=Path(client_ca).read_text("ascii", "replace"))
    except (OSError, ssl.SSLError, ValueError) as exc:
        raise ValueError(f"cannot use the TLS files {[str(p) for p in paths]}: {exc}") from None


class ServerCertificates:
    """The server's certificate chain and key, and for mTLS the client CA bundle."""

    def __init__(self, cert: Path, key: Path, client_ca: Path | None = None):
        self.cert, self.key, self.client_ca = Path(cert), Path(key), client_ca
        self._paths = [self.cert, self.key] + ([Path(client_ca)] if client_ca else [])
        self._loaded: FileState = ()
        self._rejected: FileState = ()
        self._http_loaded: FileState = ()
        self._http_rejected: FileState = ()

    def _load(self) -> grpc.ServerCertificateConfiguration:
        cert, key = self.cert.read_bytes(), self.key.read_bytes()
        # Raises if the key does not belong to the certificate, or either is malformed.
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(self.cert, self.key)
        roots = Path(self.client_ca).read_bytes() if self.client_ca else None
        if roots is not None:
            ssl.create_default_context(cadata=roots.decode("ascii", "replace"))
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=roots)

    def credentials(self) -> grpc.ServerCredentials:
        """Server credentials that follow the files; raises ValueError if they do not load."""
        state = _state(self._paths)
        try:
            initial = self._load()
        except (OSError, ssl.SSLError, ValueError) as exc:
            raise ValueError(f"cannot use the TLS files {self._paths}: {exc}") from None
        self._loaded = state
        return grpc.dynamic_ssl_server_credentials(
            initial, self.fetch, require_client_authentication=self.client_ca is not None
        )

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """gRPC's callback: a new configuration if the files changed, else None."""
        state = _state(self._paths)
        if state in (self._loaded, self._rejected):
            return None
        try:
            config = self._load()
        except (OSError, ssl.SSLError, ValueError) as exc:
            self._rejected = state
            log.error("new TLS files do not load (keeping the previous ones): %s", exc)
            return None
        if _state(self._paths) != state:  # changed while being read: next connection
            return None
        self._loaded = state
        log.info("TLS certificate reloaded from %s", self.cert)
        return config

    # --- the HTTP port: an ssl.SSLContext, reloaded in place ------------------------------

    def ssl_context(self) -> ssl.SSLContext:
        """A server context for the HTTP port (client certificates required with a CA)."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.set_alpn_protocols(["http/1.1"])
        self._http_loaded = _state(self._paths)
        try:
            context.load_cert_chain(self.cert, self.key)
            if self.client_ca is not None:
                context.load_verify_locations(cafile=str(self.client_ca))
                context.verify_mode = ssl.CERT_REQUIRED
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(f"cannot use the TLS files {self._paths}: {exc}") from None
        return context

    def refresh(self, context: ssl.SSLContext) -> bool:
        """Load changed files into ``context`` (new handshakes use them); True if loaded.

        The pair is checked on a scratch context first, so a broken one never reaches the
        live context. A replaced client CA bundle adds its CAs to those trusted (OpenSSL
        cannot forget loaded CAs); to stop trusting one, restart.
        """
        state = _state(self._paths)
        if state in (self._http_loaded, self._http_rejected):
            return False
        try:
            self._load()
            context.load_cert_chain(self.cert, self.key)
            if self.client_ca is not None:
                context.load_verify_locations(cafile=str(self.client_ca))
        except (OSError, ssl.SSLError, ValueError) as exc:
            self._http_rejected = state
            log.error("new TLS files do not load for HTTP (keeping the previous ones): %s", exc)
            return False
        self._http_loaded = state
        log.info("HTTP TLS certificate reloaded from %s", self.cert)
        return True
