"""TLS and mutual TLS on the gRPC port, with certificates from trustme; plaintext clients and clients
without a certificate are refused."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pydantic
import pytest
import trustme
from cryptography.hazmat.primitives import serialization

from service.cli import main as cli_main
from service.client import ClientTls, StreamClient
from service.errors import StartupError
from service.settings import Settings, TlsSettings
from tests.conftest import vocabulary

X = np.eye(len(vocabulary()), dtype=np.float32)[[3]]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A CA, a server certificate for localhost, and a client certificate, as PEM files."""
    folder = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    server = ca.issue_cert("localhost", "127.0.0.1")
    client = ca.issue_cert("gateway-1@example.com")
    stranger = trustme.CA().issue_cert("gateway-2@example.com")  # signed by a CA the server does not trust
    files = {
        "ca": ca.cert_pem,
        "server_cert": server.cert_chain_pems[0],
        "server_key": server.private_key_pem,
        "client_cert": client.cert_chain_pems[0],
        "client_key": client.private_key_pem,
        "stranger_cert": stranger.cert_chain_pems[0],
        "stranger_key": stranger.private_key_pem,
    }
    paths = {}
    for name, blob in files.items():
        paths[name] = folder / f"{name}.pem"
        blob.write_to_path(str(paths[name]))
    return paths


async def _one_step(target: str, tls: ClientTls | None) -> int:
    async with StreamClient(target, reconnect_timeout_s=1.0, tls=tls) as client:
        reply = await client.session("charlm").step(X)
        return reply.seq


async def test_a_tls_server_answers_tls_clients_only(start_server, pki):
    app = await start_server(tls={"cert": pki["server_cert"], "key": pki["server_key"]})
    target = f"localhost:{app.port}"
    assert await _one_step(target, ClientTls(ca=pki["ca"])) == 1
    with pytest.raises(ConnectionError):  # plaintext gets no answer from a TLS port
        await _one_step(target, None)
    with pytest.raises(ConnectionError):  # nor does a client that does not trust the server's CA ...
        await _one_step(target, ClientTls())
    with pytest.raises(ConnectionError, match="(?i)ssl|handshake|certificate"):  # ... and it says why
        await _one_step(f"127.0.0.1:{app.port}", ClientTls(server_name="localhost"))
    # By address: the certificate names 127.0.0.1 too; another name can be checked with server_name.
    assert await _one_step(f"127.0.0.1:{app.port}", ClientTls(ca=pki["ca"], server_name="localhost")) == 1
    ok = ["health", "--target", target, "--tls-ca", str(pki["ca"])]
    assert await asyncio.to_thread(cli_main, ok) == 0
    assert await asyncio.to_thread(cli_main, ["health", "--target", target, "--timeout", "1"]) == 2


async def test_mutual_tls_refuses_clients_without_a_certificate_from_its_ca(start_server, pki):
    app = await start_server(tls={"cert": pki["server_cert"], "key": pki["server_key"], "client_ca": pki["ca"]})
    target = f"localhost:{app.port}"
    member = ClientTls(ca=pki["ca"], cert=pki["client_cert"], key=pki["client_key"])
    assert await _one_step(target, member) == 1
    with pytest.raises(ConnectionError):
        await _one_step(target, ClientTls(ca=pki["ca"]))  # no client certificate
    with pytest.raises(ConnectionError):
        await _one_step(target, ClientTls(ca=pki["ca"], cert=pki["stranger_cert"], key=pki["stranger_key"]))
    flags = ["--tls-ca", str(pki["ca"]), "--tls-cert", str(pki["client_cert"]), "--tls-key", str(pki["client_key"])]
    assert await asyncio.to_thread(cli_main, ["health", "--target", target, *flags]) == 0
    assert await asyncio.to_thread(cli_main, ["health", "--target", target, "--tls-ca", str(pki["ca"])]) == 2


def test_tls_settings_come_whole_from_flags_or_the_environment(pki, monkeypatch):
    with pytest.raises(pydantic.ValidationError, match="tls.cert and tls.key go together"):
        TlsSettings(cert=pki["server_cert"])
    with pytest.raises(pydantic.ValidationError, match="needs the server's own tls.cert"):
        TlsSettings(client_ca=pki["ca"])
    monkeypatch.setenv("RNNSERVE_TLS__CERT", str(pki["server_cert"]))
    monkeypatch.setenv("RNNSERVE_TLS__KEY", str(pki["server_key"]))
    monkeypatch.setenv("RNNSERVE_TLS__CLIENT_CA", str(pki["ca"]))
    assert Settings().tls == TlsSettings(cert=pki["server_cert"], key=pki["server_key"], client_ca=pki["ca"])
    with pytest.raises(ValueError, match="go together"):
        ClientTls(cert=pki["client_cert"])
    for name in ("CERT", "KEY", "CLIENT_CA"):  # an empty variable is unset, not the current directory
        monkeypatch.setenv(f"RNNSERVE_TLS__{name}", "")
    assert Settings().tls == TlsSettings()


async def test_unreadable_or_foreign_tls_files_stop_the_start_with_a_clear_message(start_server, pki, tmp_path):
    with pytest.raises(StartupError, match="cannot read a TLS file"):
        await start_server(tls={"cert": tmp_path / "absent.pem", "key": pki["server_key"]})
    der = tmp_path / "not-pem.crt"
    der.write_bytes(b"\x30\x82\x01\x0a")
    with pytest.raises(StartupError, match="must be PEM"):
        await start_server(tls={"cert": der, "key": pki["server_key"]})
    # PEM, but not a pair (the client's key with the server's certificate): named, not "cannot listen".
    with pytest.raises(StartupError, match="are not a certificate and its .*private key"):
        await start_server(tls={"cert": pki["server_cert"], "key": pki["client_key"]})
    encrypted = tmp_path / "encrypted.key"
    key = serialization.load_pem_private_key(pki["server_key"].read_bytes(), password=None)
    encrypted.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    with pytest.raises(StartupError, match="the private key is encrypted"):  # never a prompt on stdin
        await start_server(tls={"cert": pki["server_cert"], "key": encrypted})
    with pytest.raises(StartupError, match="--tls-client-ca .* holds no CA certificate"):
        await start_server(tls={"cert": pki["server_cert"], "key": pki["server_key"], "client_ca": pki["server_key"]})


def test_the_client_commands_say_which_tls_file_they_cannot_read(tmp_path, capsys):
    missing = str(tmp_path / "absent.pem")
    assert cli_main(["health", "--target", "127.0.0.1:1", "--tls-ca", missing]) == 2
    assert "cannot read" in capsys.readouterr().err
