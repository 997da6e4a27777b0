"""Redis over TLS (rediss://) with a password, the server's certificate checked against a CA of our own:
a redis-server started with --tls-port and --requirepass, certificates from trustme."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pydantic
import pytest

from bench.process import RedisProcess
from service.errors import StartupError, StoreRefused
from service.server import open_store
from service.settings import RedisSettings
from service.state.redis_store import _redacted
from service.state.store import Commit, Outcome
from tests.conftest import exchange, redis_certificates
from tests.service.test_session_contract import assert_matches, steps

PASSWORD = "s3cret-for-tests"


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, Path, Path]]:
    """(port, the CA that signed Redis's certificate, another CA)."""
    folder = redis_certificates(tmp_path_factory.mktemp("redis-tls"))
    server = RedisProcess(folder, tls=folder, password=PASSWORD)
    server.start()
    yield server.port, folder / "ca.pem", folder / "other.pem"
    server.close()


async def test_the_store_speaks_tls_with_a_password(tls_redis):
    port, ca, _ = tls_redis
    store = open_store(RedisSettings(url=f"rediss://:{PASSWORD}@localhost:{port}/0", tls_ca=ca))
    await store.ping()
    (result,) = await store.commit_many([Commit("k", None, "e:1", b"over tls", 60)])
    assert result.outcome is Outcome.OK
    (stored,) = await store.load_many(["k"])
    assert stored is not None and stored.record == b"over tls"  # type: ignore[union-attr]
    await store.close()


async def test_a_server_streams_through_a_tls_redis(start_server, tls_redis):
    port, ca, _ = tls_redis
    app = await start_server(url=f"rediss://:{PASSWORD}@localhost:{port}/0", redis={"tls_ca": ca})
    assert_matches(await exchange(f"127.0.0.1:{app.port}", steps("tls", 1, 3)), first=1)


async def test_a_wrong_password_is_refused_and_an_untrusted_redis_unreachable(tls_redis):
    port, ca, other = tls_redis
    wrong = open_store(RedisSettings(url=f"rediss://:wrong@localhost:{port}/0", tls_ca=ca))
    with pytest.raises(StoreRefused):  # a configuration error: the server does not start on it
        await wrong.ping()
    await wrong.close()
    untrusted = open_store(RedisSettings(url=f"rediss://:{PASSWORD}@localhost:{port}/0", tls_ca=other))
    # A certificate that does not verify is not an outage: retrying cannot help, and the message says why.
    with pytest.raises(
        StoreRefused, match="TLS with the session store .* failed .*certificate verify failed"
    ) as refused:
        await untrusted.ping()
    assert PASSWORD not in refused.value.message  # the URL is redacted in messages
    await untrusted.close()


def test_redis_tls_files_that_cannot_be_used_stop_the_start_naming_them(tls_redis, tmp_path):
    port, ca, _ = tls_redis
    url = f"rediss://:{PASSWORD}@localhost:{port}/0"
    with pytest.raises(StartupError, match="cannot use the Redis TLS files"):
        open_store(RedisSettings(url=url, tls_ca=tmp_path / "absent.pem"))
    with pytest.raises(StartupError, match="cannot use the Redis TLS files"):
        open_store(RedisSettings(url=url, tls_ca=ca, tls_cert=ca, tls_key=ca))  # a CA is no client key pair


@pytest.mark.parametrize(
    "url",
    [
        "rediss//:Sekrit-1@localhost:6379/0",  # a typo in the scheme
        "rediss://:Ab/Sekrit-1@localhost:6379/0",  # a / in the password, not percent-encoded
    ],
)
def test_a_redis_url_that_does_not_parse_never_shows_its_password(url):
    try:
        open_store(RedisSettings(url=url))
    except (pydantic.ValidationError, StartupError, ValueError) as err:
        assert "Sekrit" not in str(err) and "Ab" not in str(err).replace("Able", ""), str(err)
    else:
        pytest.fail("the URL was taken")


def test_a_password_in_the_query_string_is_redacted_too():
    assert _redacted("rediss://host:6379/0?password=Sekrit-1&db=1") == "rediss://host:6379/0?password=***&db=1"
    assert _redacted("redis://user:Sekrit-1@host/0") == "redis://user:***@host/0"


def test_redis_tls_settings_need_a_rediss_url(tmp_path):
    with pytest.raises(pydantic.ValidationError, match=r"rediss:// or rediss\+cluster:// URL only"):
        RedisSettings(url="redis://localhost:6379/0", tls_ca=tmp_path / "ca.pem")
    with pytest.raises(pydantic.ValidationError, match="go together"):
        RedisSettings(url="rediss://localhost:6379/0", tls_cert=tmp_path / "c.pem")


async def test_a_server_does_not_start_on_credentials_redis_refuses(start_server, tls_redis):
    """Unlike a Redis that is not up yet (the server starts unready), a refusal is a configuration error."""
    port, ca, _ = tls_redis
    with pytest.raises(StoreRefused, match="refused the credentials"):
        await start_server(url=f"rediss://:wrong@localhost:{port}/0", redis={"tls_ca": ca})
