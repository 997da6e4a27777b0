"""Tenants: bearer tokens from a file of salted hashes, sessions namespaced by tenant, a per-tenant limit
on live sessions counted across replicas. Real servers, real redis-server, real tritonclient."""

from __future__ import annotations

import asyncio
import os
import stat
from pathlib import Path

import grpc
import hypothesis.strategies as st
import numpy as np
import pydantic
import pytest
import tritonclient.grpc.aio as triton_aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from tritonclient.utils import InferenceServerException

from service.api.pb.rnnserve.v1 import rnnserve_pb2 as pb
from service.api.pb.rnnserve.v1 import rnnserve_pb2_grpc as pb_grpc
from service.auth import new_token, parse_token_file
from service.cli import main as cli_main
from service.client import StepError, StreamClient, open_channel
from service.errors import StartupError, Unauthenticated
from service.settings import Settings
from service.state.store import live_sessions_key, session_key
from tests.conftest import TEST_REPO, offline_logits, step_request, vocabulary

FEATURES = len(vocabulary())
EYE = np.eye(FEATURES, dtype=np.float32)
ISSUED = {tenant: new_token(tenant) for tenant in ("acme", "globex", "ops")}
TOKENS = {tenant: token for tenant, (token, _) in ISSUED.items()}


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "tokens"
    path.write_text("# tenants\n" + "".join(line + "\n" for _, line in ISSUED.values()))
    return path


def auth(token_file: Path, **extra: object) -> dict[str, object]:
    return {"token_file": token_file, "admin_tenants": ["ops"], **extra}


def bearer(tenant: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {TOKENS[tenant]}"),)


async def stream_once(target: str, requests: list[pb.StepRequest], metadata=()) -> list[pb.StepResponse]:
    async with grpc.aio.insecure_channel(target) as channel:
        call = pb_grpc.RnnServeStub(channel).Stream(metadata=metadata)
        answers = []
        for request in requests:
            await call.write(request)
            answers.append(await call.read())
        await call.done_writing()
        return answers


# -- the token file --------------------------------------------------------------------------------


def test_rnnserve_token_prints_a_token_and_stores_only_its_salted_hash(tmp_path, capsys):
    path = tmp_path / "tokens"
    assert cli_main(["token", "--file", str(path), "--tenant", "acme"]) == 0
    path.write_text(path.read_text().rstrip("\n"))  # an editor left the last line without its newline
    assert cli_main(["token", "--file", str(path), "--tenant", "acme"]) == 0
    first, second = capsys.readouterr().out.split()
    text = path.read_text()
    assert first not in text and second not in text and first != second
    assert all(token.startswith("rns_") for token in (first, second))  # never "-": a flag to a command line
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    entries = parse_token_file(text, "tokens")
    assert [e.tenant for e in entries] == ["acme", "acme"] and entries[0].salt != entries[1].salt
    assert cli_main(["token", "--file", str(path), "--tenant", "a:b"]) == 2  # ":" would split keys


@pytest.mark.parametrize(
    "line",
    ["acme", "acme sha256:00", "acme md5:00:" + "0" * 64, "acme sha256:zz:" + "0" * 64, "a/b sha256:00:" + "0" * 64],
)
def test_a_malformed_token_file_stops_the_start_naming_its_line(tmp_path, line):
    path = tmp_path / "tokens"
    path.write_text(f"# comment\n\n{line}\n")
    with pytest.raises(ValueError, match="line 3"):
        parse_token_file(path.read_text(), str(path))


async def test_a_server_with_a_malformed_token_file_does_not_start(start_server, tmp_path):
    path = tmp_path / "tokens"
    path.write_text("acme not-a-hash\n")
    with pytest.raises(StartupError, match="line 1"):
        await start_server(auth={"token_file": path})


def test_admin_tenants_come_comma_separated_from_the_environment_and_must_be_tenant_names(monkeypatch, tmp_path):
    monkeypatch.setenv("RNNSERVE_AUTH__TOKEN_FILE", str(tmp_path / "tokens"))
    monkeypatch.setenv("RNNSERVE_AUTH__ADMIN_TENANTS", "ops, dev")
    assert Settings().auth.admin_tenants == ["ops", "dev"]
    monkeypatch.setenv("RNNSERVE_AUTH__ADMIN_TENANTS", "ops,a:b")
    with pytest.raises(pydantic.ValidationError, match="not a tenant name"):
        Settings()


def test_a_token_is_looked_up_by_the_salt_it_carries(tmp_path):
    """However many lines the file holds, a token is checked against the one line its salt names; a token
    not of the issued form, or naming no line, is refused without a hash over the file."""
    from service.auth import Authenticator
    from service.settings import AuthSettings

    issued = [new_token("acme") for _ in range(2000)]
    path = tmp_path / "tokens"
    path.write_text("".join(line + "\n" for _, line in issued))
    authenticator = Authenticator(AuthSettings(token_file=path))
    assert authenticator.tenant((("authorization", f"Bearer {issued[1234][0]}"),)) == "acme"
    forged = issued[5][0][:-1] + ("A" if issued[5][0][-1] != "A" else "B")  # the right salt, a wrong secret
    unknown = new_token("acme")[0]
    for token in (forged, unknown, "-leading-dash", "rns_" + "0" * 32 + "_" + "x" * 43):
        with pytest.raises(Unauthenticated):
            authenticator.tenant((("authorization", f"Bearer {token}"),))


def test_tenant_settings_need_a_token_file():
    with pytest.raises(pydantic.ValidationError, match="need auth.token_file"):
        Settings(auth={"max_sessions_per_tenant": 3})


# -- who may call ----------------------------------------------------------------------------------


async def test_every_call_without_a_valid_token_is_unauthenticated_but_health(start_server, token_file):
    app = await start_server(auth=auth(token_file))
    target = f"127.0.0.1:{app.port}"
    for metadata in [(), (("authorization", "Bearer wrong"),), (("authorization", f"Basic {TOKENS['acme']}"),)]:
        async with grpc.aio.insecure_channel(target) as channel:
            stub = pb_grpc.RnnServeStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.ListModels(pb.ListModelsRequest(), metadata=metadata)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "Bearer" in refused.value.details() or "token" in refused.value.details()
            for call in (stub.Stream(metadata=metadata), stub.StreamBatch(metadata=metadata)):
                with pytest.raises(grpc.aio.AioRpcError) as refused:  # refused before anything is read
                    await call.read()
                assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
            assert health.status == health_pb2.HealthCheckResponse.SERVING
    triton = triton_aio.InferenceServerClient(target)
    try:
        with pytest.raises(InferenceServerException, match="UNAUTHENTICATED|bearer"):
            await triton.get_model_metadata("charlm")
        assert (await triton.get_model_metadata("charlm", headers=dict(bearer("acme")))).name == "charlm"
    finally:
        await triton.close()
    assert app.metrics.errors.labels("ListModels", "UNAUTHENTICATED")._value.get() == 3
    assert app.engine.sessions_in_flight == 0 and len(app.engine.cache) == 0  # nothing reached the engine


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value=st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=300))
def test_any_authorization_value_but_a_token_is_unauthenticated(tenant_target, value):
    async def call() -> grpc.StatusCode:
        async with grpc.aio.insecure_channel(tenant_target) as channel:
            try:
                await pb_grpc.RnnServeStub(channel).ListModels(
                    pb.ListModelsRequest(), metadata=(("authorization", value),), timeout=5
                )
            except grpc.aio.AioRpcError as err:
                return err.code()
            return grpc.StatusCode.OK

    code = asyncio.run(call())
    assert code == grpc.StatusCode.UNAUTHENTICATED, value


@pytest.fixture(scope="module")
def tenant_target(tmp_path_factory) -> str:
    """A server with tenants in a thread of its own (hypothesis runs synchronous tests)."""
    import threading

    from prometheus_client import CollectorRegistry

    from service.server import create_server
    from tests.conftest import server_settings

    path = tmp_path_factory.mktemp("tokens") / "tokens"
    path.write_text(ISSUED["acme"][1] + "\n")
    ready: list[str] = []
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()

    async def run() -> None:
        app = await create_server(server_settings(auth={"token_file": path}), CollectorRegistry())
        ready.append(f"127.0.0.1:{app.port}")
        await stop.wait()
        await app.stop(grace_s=0.2)

    thread = threading.Thread(target=loop.run_until_complete, args=(run(),), daemon=True)
    thread.start()
    while not ready:
        thread.join(0.05)
    yield ready[0]
    loop.call_soon_threadsafe(stop.set)
    thread.join(10)
    loop.close()


async def test_only_admin_tenants_load_and_unload_models_and_read_statistics(start_server, token_file):
    app = await start_server(auth=auth(token_file))
    triton = triton_aio.InferenceServerClient(f"127.0.0.1:{app.port}")
    try:
        with pytest.raises(InferenceServerException, match="may not load or unload"):
            await triton.unload_model("charlm", headers=dict(bearer("acme")))
        with pytest.raises(InferenceServerException, match="PERMISSION_DENIED|read their statistics"):
            await triton.get_inference_statistics("charlm", headers=dict(bearer("acme")))  # other tenants' traffic
        assert await triton.get_inference_statistics("charlm", headers=dict(bearer("ops")))
        assert app.engine.registry.get("charlm")  # still loaded
        await triton.unload_model("charlm", headers=dict(bearer("ops")))
        assert not await triton.is_model_ready("charlm", headers=dict(bearer("acme")))
    finally:
        await triton.close()


async def test_a_token_added_or_removed_counts_after_the_reload_interval(start_server, tmp_path):
    path = tmp_path / "tokens"
    old, new = new_token("acme"), new_token("acme")
    path.write_text(old[1] + "\n")
    app = await start_server(auth={"token_file": path, "reload_interval_s": 0.1})
    target = f"127.0.0.1:{app.port}"

    async def list_models(token: str) -> grpc.StatusCode:
        async with open_channel(target, token=token) as channel:
            try:
                await pb_grpc.RnnServeStub(channel).ListModels(pb.ListModelsRequest())
            except grpc.aio.AioRpcError as err:
                return err.code()
            return grpc.StatusCode.OK

    assert await list_models(old[0]) == grpc.StatusCode.OK
    assert await list_models(new[0]) == grpc.StatusCode.UNAUTHENTICATED
    path.write_text("\ufeff" + new[1] + "\r\n")  # rotated, by an editor that writes a BOM and CRLF
    await asyncio.sleep(0.2)
    assert await list_models(new[0]) == grpc.StatusCode.OK
    assert await list_models(old[0]) == grpc.StatusCode.UNAUTHENTICATED
    path.write_text("garbage\n")  # a broken file keeps the tokens read last
    await asyncio.sleep(0.2)
    assert await list_models(new[0]) == grpc.StatusCode.OK


# -- whose session ---------------------------------------------------------------------------------


async def test_two_tenants_with_the_same_session_id_never_touch_each_others(start_server, token_file, store_url):
    """acme and globex both use session id 'shared' (and each has one the other has not): neither can
    step, read, delete or even learn of the other's; acme's stream ends exactly as one run offline."""
    app = await start_server(url=store_url, auth=auth(token_file))
    target = f"127.0.0.1:{app.port}"
    text = EYE[[(7 * t) % FEATURES for t in range(6)]]
    async with (
        StreamClient(target, token=TOKENS["acme"]) as acme,
        StreamClient(target, token=TOKENS["globex"]) as globex,
    ):
        mine = acme.session("charlm", "shared")
        for t in range(3):
            await mine.step(text[[t]])
        private = acme.session("charlm", "private")
        await private.step(text[[0]])
        theirs = globex.session("charlm", "shared")
        assert (await theirs.step(EYE[[1]])).seq == 1  # a start of globex's own, not a replacement
        refused: list[StepError] = []
        for request in [
            step_request("shared", 4, text[[3]]),  # acme's next step, sent by globex
            step_request("private", 2, text[[1]]),
        ]:
            (answer,) = await stream_once(target, [request], bearer("globex"))
            refused.append(answer.error)
        assert [e.code for e in refused] == [grpc.StatusCode.FAILED_PRECONDITION.value[0]] + [
            grpc.StatusCode.NOT_FOUND.value[0]
        ]  # globex's own 'shared' is at seq 1; 'private' is unknown to globex
        assert "expired or was never started" in refused[1].message and "acme" not in refused[1].message
        async with open_channel(target, token=TOKENS["globex"]) as channel:
            stub = pb_grpc.RnnServeStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as hidden:
                await stub.GetSession(pb.SessionRef(model="charlm", session_id="private"))
            assert hidden.value.code() == grpc.StatusCode.NOT_FOUND
            assert not (await stub.DeleteSession(pb.SessionRef(model="charlm", session_id="private"))).deleted
            info = await stub.GetSession(pb.SessionRef(model="charlm", session_id="shared"))
            assert info.last_seq == 1
        for t in range(3, 6):
            reply = await mine.step(text[[t]])
        assert reply.seq == 6
        assert np.allclose(reply.outputs["logits"], offline_logits(TEST_REPO / "charlm" / "1", text)[-1], atol=1e-5)
        assert (await private.step(text[[1]])).seq == 2  # untouched by globex
    if store_url is not None:
        import redis

        keys = {k.decode() for k in redis.Redis.from_url(store_url).keys("*")}
        assert session_key("rnnserve", "charlm", "shared", "acme") in keys
        assert session_key("rnnserve", "charlm", "shared", "globex") in keys
        assert session_key("rnnserve", "charlm", "shared") not in keys  # nothing outside a tenant


async def test_triton_sequences_of_two_tenants_with_one_id_stay_apart(start_server, token_file, redis_store_url):
    app = await start_server(url=redis_store_url, auth=auth(token_file))
    target = f"127.0.0.1:{app.port}"
    results = {}
    for tenant, steps in (("acme", 3), ("globex", 1), ("acme", 1)):
        client = triton_aio.InferenceServerClient(target)
        try:
            for t in range(steps):
                x = triton_aio.InferInput("x", [1, 1, FEATURES], "FP32")
                x.set_data_from_numpy(EYE[[t]][None])
                start = t == 0 and tenant not in results
                answer = await client.infer(
                    "charlm", [x], sequence_id=42, sequence_start=start, headers=dict(bearer(tenant))
                )
                results[tenant] = answer.get_response().parameters["rnnserve_seq"].int64_param
        finally:
            await client.close()
    assert results == {"acme": 4, "globex": 1}


# -- the per-tenant limit --------------------------------------------------------------------------


async def batch(target: str, tenant: str, steps: list[pb.StepRequest]) -> list[pb.StepResponse]:
    """One StepBatch as `tenant`; its answers."""
    async with grpc.aio.insecure_channel(target) as channel:
        call = pb_grpc.RnnServeStub(channel).StreamBatch(metadata=bearer(tenant))
        await call.write(pb.StepBatch(id=1, steps=steps))
        await call.done_writing()
        (result,) = [r async for r in call]
        return list(result.responses)


def starts(*sids: str) -> list[pb.StepRequest]:
    return [step_request(sid, 1, EYE[[i]], start=True) for i, sid in enumerate(sids)]


def codes(answers: list[pb.StepResponse]) -> list[str]:
    return [grpc.StatusCode.OK.name if not a.HasField("error") else _CODES[a.error.code] for a in answers]


_CODES = {status.value[0]: status.name for status in grpc.StatusCode}


async def test_a_tenant_holds_at_most_its_limit_of_live_sessions_across_replicas(start_server, token_file, store_url):
    """Limit 3, two replicas on one Redis (or one replica on the in-memory store): the fourth start is
    RESOURCE_EXHAUSTED in-band and changes nothing; steps of live sessions and restarts of them go on;
    another tenant is not counted; an end, a delete or an idle-out frees a place."""
    replicas = 2 if store_url else 1
    limited = auth(token_file, max_sessions_per_tenant=3)
    apps = [await start_server(url=store_url, auth=limited, sessions={"state_ttl_s": 3}) for _ in range(replicas)]
    one, other = f"127.0.0.1:{apps[0].port}", f"127.0.0.1:{apps[-1].port}"
    assert codes(await batch(one, "acme", starts("a", "b"))) == ["OK", "OK"]
    refused = await batch(other, "acme", starts("c", "d"))
    assert codes(refused) == ["OK", "RESOURCE_EXHAUSTED"]
    assert "holds 3 live sessions, its limit" in refused[1].error.message
    assert codes(await batch(one, "acme", starts("d"))) == ["RESOURCE_EXHAUSTED"]
    nexts = await batch(other, "acme", [step_request(sid, 2, EYE[[5]]) for sid in "abc"])
    assert codes(nexts) == ["OK"] * 3  # live sessions go on, on any replica
    assert codes(await batch(one, "acme", starts("a"))) == ["OK"]  # replaces a live session: not one more
    assert codes(await batch(other, "globex", starts("g0", "g1", "g2"))) == ["OK"] * 3  # counted apart

    assert codes(await batch(one, "acme", [step_request("b", 3, EYE[[1]], end=True)])) == ["OK"]
    assert codes(await batch(other, "acme", starts("d"))) == ["OK"]  # the end freed a place
    async with open_channel(one, token=TOKENS["acme"]) as channel:
        ref = pb.SessionRef(model="charlm", session_id="c")
        assert (await pb_grpc.RnnServeStub(channel).DeleteSession(ref)).deleted
    assert codes(await batch(one, "acme", starts("e", "f"))) == ["OK", "RESOURCE_EXHAUSTED"]  # so did the delete
    await asyncio.sleep(3.2)  # every acme session idles out (state_ttl_s 3)
    assert codes(await batch(other, "acme", starts("h0", "h1", "h2", "h3"))) == ["OK"] * 3 + ["RESOURCE_EXHAUSTED"]
    if store_url is not None:
        import redis

        live = redis.Redis.from_url(store_url).zrange(live_sessions_key("rnnserve", "acme"), 0, -1)
        expected = [session_key("rnnserve", "charlm", f"h{i}", "acme") for i in range(3)]
        assert sorted(k.decode() for k in live) == expected


async def test_starts_racing_on_two_replicas_never_pass_the_limit(start_server, token_file, redis_store_url):
    """40 different sessions started at once, 20 on each replica, limit 10: exactly 10 are applied."""
    limited = auth(token_file, max_sessions_per_tenant=10)
    apps = [await start_server(url=redis_store_url, auth=limited) for _ in range(2)]
    answers = await asyncio.gather(
        *(batch(f"127.0.0.1:{apps[i % 2].port}", "acme", starts(*(f"r{i}-{j}" for j in range(4)))) for i in range(10))
    )
    outcomes = [code for answer in answers for code in codes(answer)]
    assert outcomes.count("OK") == 10 and outcomes.count("RESOURCE_EXHAUSTED") == 30


async def test_a_revoked_token_ends_its_open_stream_at_the_next_request(start_server, tmp_path):
    path = tmp_path / "tokens"
    kept, revoked = new_token("acme"), new_token("acme")
    path.write_text(kept[1] + "\n" + revoked[1] + "\n")
    app = await start_server(auth={"token_file": path, "reload_interval_s": 0.1})
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        call = pb_grpc.RnnServeStub(channel).Stream(metadata=(("authorization", f"Bearer {revoked[0]}"),))
        await call.write(step_request("s", 1, EYE[[1]], start=True))
        assert not (await call.read()).HasField("error")
        path.write_text(kept[1] + "\n")
        await asyncio.sleep(0.3)
        await call.write(step_request("s", 2, EYE[[2]]))
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            await call.read()
        assert ended.value.code() == grpc.StatusCode.UNAUTHENTICATED and "revoked" in ended.value.details()


async def test_sessions_started_before_the_limit_count_once_stepped_and_may_restart(
    start_server, token_file, redis_store_url
):
    """A replica without the limit (a rolling change) starts three sessions; a replica with limit 2 lets
    them be restarted (a restart replaces a live session: never refused), counts them from then on, and
    refuses new sessions while they hold the places. The tenant's live set expires with its sessions."""
    before = await start_server(url=redis_store_url, auth=auth(token_file))
    after = await start_server(url=redis_store_url, auth=auth(token_file, max_sessions_per_tenant=2))
    old, new = f"127.0.0.1:{before.port}", f"127.0.0.1:{after.port}"
    assert codes(await batch(old, "acme", starts("p1", "p2", "p3"))) == ["OK"] * 3
    restart = [step_request("p1", 1, EYE[[9]], start=True)]
    restart[0].start_id = 77
    assert codes(await batch(new, "acme", restart)) == ["OK"]  # over the limit already, and still allowed
    assert codes(await batch(new, "acme", [step_request("p2", 2, EYE[[1]])])) == ["OK"]
    assert codes(await batch(new, "acme", starts("n1"))) == ["RESOURCE_EXHAUSTED"]  # p1 and p2 count now
    import redis

    with redis.Redis.from_url(redis_store_url) as client:
        assert 0 < client.pttl(live_sessions_key("rnnserve", "acme")) <= 3600 * 1000
