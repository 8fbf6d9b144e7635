"""Transport security and tokens, end to end: TLS, mTLS, certificate rotation without a
restart, token files with several tokens, and what stays open (health) and what does not
(every model RPC and reflection)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from service.client import ClassifierClient, request_id
from tests.certs import Authority
from tests.integration.service.conftest import ServerProcess

pytestmark = [pytest.mark.integration, pytest.mark.slow]


class BearerToken(grpc.StreamStreamClientInterceptor):
    """Adds the authorization header to a streaming call (what grpcurl's -H does)."""

    def __init__(self, token: str):
        self.header = ("authorization", f"Bearer {token}")

    def intercept_stream_stream(self, continuation, details, requests):  # type: ignore[no-untyped-def]
        metadata = [*(details.metadata or ()), self.header]
        return continuation(details._replace(metadata=metadata), requests)


def image(quick_model: dict[str, Path]) -> Path:
    return next((quick_model["data"] / "val").rglob("*.jpg"))


def code_of(client: ClassifierClient, path: Path) -> grpc.StatusCode:
    try:
        client.classify([path], timeout=10)
    except grpc.RpcError as exc:
        return exc.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


def install(cert: Path, key: Path, folder: Path) -> tuple[Path, Path]:
    """Put a certificate pair where the server reads it, each file replaced atomically."""
    for source, name in ((key, "server.key"), (cert, "server.pem")):
        shutil.copy(source, folder / f".{name}.new")
        os.replace(folder / f".{name}.new", folder / name)
    return folder / "server.pem", folder / "server.key"


def test_tls_refuses_plaintext_serves_clients_that_trust_the_ca_and_rotates_certificates(
    start_server: type[ServerProcess], quick_model: dict[str, Path], tmp_path: Path
) -> None:
    old_ca, new_ca = Authority.create("old-ca"), Authority.create("new-ca")
    old_ca_file, new_ca_file = old_ca.write(tmp_path), new_ca.write(tmp_path)
    live = tmp_path / "live"
    live.mkdir()
    cert, key = install(*old_ca.issue(tmp_path, "old-server", server=True), live)
    server = start_server(quick_model["repository"], "--tls-cert", str(cert), "--tls-key", str(key))
    server.wait_for_event("serving")
    assert server.wait_for_event("listening")["tls"] is True
    target = f"localhost:{server.port}"
    path = image(quick_model)

    with ClassifierClient(target) as plaintext:
        assert code_of(plaintext, path) is grpc.StatusCode.UNAVAILABLE
    with ClassifierClient(target, root_certificates=old_ca_file) as trusting:
        assert code_of(trusting, path) is grpc.StatusCode.OK
    with ClassifierClient(target, root_certificates=new_ca_file) as other:
        assert code_of(other, path) is grpc.StatusCode.UNAVAILABLE

    install(*new_ca.issue(tmp_path, "new-server", server=True), live)
    time.sleep(0.1)
    with ClassifierClient(target, root_certificates=new_ca_file) as renewed:
        assert code_of(renewed, path) is grpc.StatusCode.OK  # new connection, new cert
    with ClassifierClient(target, root_certificates=old_ca_file) as stale:
        assert code_of(stale, path) is grpc.StatusCode.UNAVAILABLE
    assert server.process.poll() is None  # no restart
    assert "TLS certificate reloaded from " + str(cert) in server.messages()

    # A broken pair (key of another certificate) is refused; the current one stays.
    other_cert, _ = old_ca.issue(tmp_path, "stray", server=True)
    shutil.copy(other_cert, live / ".server.pem.new")
    os.replace(live / ".server.pem.new", live / "server.pem")
    with ClassifierClient(target, root_certificates=new_ca_file) as still:
        assert code_of(still, path) is grpc.StatusCode.OK
    assert any(m.startswith("new TLS files do not load") for m in server.messages())


def test_mtls_requires_a_client_certificate_signed_by_the_client_ca(
    start_server: type[ServerProcess], quick_model: dict[str, Path], tmp_path: Path
) -> None:
    server_ca, client_ca, rogue_ca = (
        Authority.create(n) for n in ("server-ca", "client-ca", "rogue")
    )
    cert, key = server_ca.issue(tmp_path, "server", server=True)
    client_cert, client_key = client_ca.issue(tmp_path, "client", server=False)
    rogue_cert, rogue_key = rogue_ca.issue(tmp_path, "rogue-client", server=False)
    roots = server_ca.write(tmp_path)
    server = start_server(
        quick_model["repository"],
        "--tls-cert",
        str(cert),
        "--tls-key",
        str(key),
        "--tls-client-ca",
        str(client_ca.write(tmp_path)),
    )
    server.wait_for_event("serving")
    target, path = f"localhost:{server.port}", image(quick_model)
    with ClassifierClient(target, root_certificates=roots) as anonymous:
        assert code_of(anonymous, path) is grpc.StatusCode.UNAVAILABLE
    with ClassifierClient(
        target, root_certificates=roots, certificate_chain=rogue_cert, private_key=rogue_key
    ) as rogue:
        assert code_of(rogue, path) is grpc.StatusCode.UNAVAILABLE
    with ClassifierClient(
        target, root_certificates=roots, certificate_chain=client_cert, private_key=client_key
    ) as client:
        assert code_of(client, path) is grpc.StatusCode.OK
        assert client.health() == "SERVING"
    # The CLI takes the same files.
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "service.client",
            "--target",
            target,
            "--ca",
            str(roots),
            "--cert",
            str(client_cert),
            "--key",
            str(client_key),
            "health",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0 and done.stdout.strip() == "SERVING", done.stderr


def test_tokens_from_a_file_and_the_environment_rotate_without_a_restart(
    start_server: type[ServerProcess], quick_model: dict[str, Path], tmp_path: Path
) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("# rotated by ops\nalpha-token\nbeta-token\n")
    server = start_server(
        quick_model["repository"],
        "--auth-token-file",
        str(tokens),
        env={"CLASSIFIER_AUTH_TOKEN": "env-token"},
    )
    server.wait_for_event("serving")
    path = image(quick_model)
    with server.client() as anonymous:
        assert anonymous.health() == "SERVING"  # probes need no token
        assert code_of(anonymous, path) is grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as info:
            anonymous.list_models()
        assert info.value.code() is grpc.StatusCode.UNAUTHENTICATED
        assert "authorization: Bearer" in str(info.value.details())
        assert request_id(info.value)  # refused calls have request ids too
    for token in ("alpha-token", "beta-token", "env-token"):
        with server.client(token=token) as client:
            assert code_of(client, path) is grpc.StatusCode.OK, token
    with server.client(token="alpha-tokenX") as wrong:
        assert code_of(wrong, path) is grpc.StatusCode.UNAUTHENTICATED

    # Reflection needs the token as well (grpcurl -H 'authorization: Bearer ...').
    with grpc.insecure_channel(server.target) as channel, pytest.raises(grpc.RpcError):
        ProtoReflectionDescriptorDatabase(channel).get_services()
    with grpc.insecure_channel(server.target) as channel:
        authorized = grpc.intercept_channel(channel, BearerToken("beta-token"))
        services = ProtoReflectionDescriptorDatabase(authorized).get_services()
    assert "classifier.v1.ImageClassifier" in services

    replacement = tmp_path / "tokens.new"
    replacement.write_text("gamma-token\n")
    os.replace(replacement, tokens)
    time.sleep(1.5)  # the file is looked at once a second
    with server.client(token="alpha-token") as retired:
        assert code_of(retired, path) is grpc.StatusCode.UNAUTHENTICATED
    with server.client(token="gamma-token") as rotated:
        assert code_of(rotated, path) is grpc.StatusCode.OK
    series = server.series()
    refused = [s for s in series if 'code="UNAUTHENTICATED"' in s]
    assert refused and all('model="_unknown"' in s for s in refused)


def test_the_http_port_uses_the_same_tls_files_and_tokens(
    start_server: type[ServerProcess], quick_model: dict[str, Path], tmp_path: Path
) -> None:
    import ssl
    import urllib.error
    import urllib.request

    ca = Authority.create("http-ca")
    ca_file = ca.write(tmp_path)
    live = tmp_path / "live"
    live.mkdir()
    cert, key = install(*ca.issue(tmp_path, "server", server=True), live)
    tokens = tmp_path / "tokens"
    tokens.write_text("http-token\n")
    server = start_server(
        quick_model["repository"],
        "--tls-cert",
        str(cert),
        "--tls-key",
        str(key),
        "--auth-token-file",
        str(tokens),
    )
    server.wait_for_event("serving")
    base = f"https://localhost:{server.http_port}"
    trusting = ssl.create_default_context(cafile=str(ca_file))

    def get(path: str, context: ssl.SSLContext | None, **headers: str) -> int:
        request = urllib.request.Request(base + path, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=10, context=context) as response:
                return int(response.status)
        except urllib.error.HTTPError as exc:
            return exc.code

    assert get("/v2/health/ready", trusting) == 200  # health: no token
    assert get("/v1/models", trusting) == 401
    assert get("/v1/models", trusting, authorization="Bearer http-token") == 200
    with pytest.raises(urllib.error.URLError):  # a client that does not trust the CA
        get("/v2/health/ready", ssl.create_default_context())
    with pytest.raises((urllib.error.URLError, ConnectionError)):  # plaintext to a TLS port
        urllib.request.urlopen(f"http://localhost:{server.http_port}/v2/health/ready", timeout=10)

    other = Authority.create("renewed-ca")
    install(*other.issue(tmp_path, "renewed", server=True), live)
    time.sleep(2.5)  # the HTTP port looks at its files once a second
    renewed = ssl.create_default_context(cafile=str(other.write(tmp_path)))
    assert get("/v2/health/ready", renewed) == 200  # rotated without a restart
    assert any(m.startswith("HTTP TLS certificate reloaded") for m in server.messages())
