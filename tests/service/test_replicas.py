"""What a shared Redis makes possible and what it must refuse: version pinning, foreign and corrupt
records, a stale replica losing a compare-and-set race, and a store that goes away."""

from __future__ import annotations

import asyncio
import shutil
import time

import grpc
import numpy as np
import pytest
import redis

from service.api.pb.rnnserve.v1 import rnnserve_pb2 as pb
from service.api.pb.rnnserve.v1 import rnnserve_pb2_grpc as pb_grpc
from service.client import StepError, StreamClient
from service.state.store import session_key
from tests.conftest import (
    TEST_REPO,
    exchange,
    held_out_text,
    logits_of,
    offline_logits,
    one_hot_text,
    step_request,
    variant_repo,
    vocabulary,
)
from tests.service.test_session_contract import TOLERANCE, X, assert_error, assert_matches, last_seq, steps


async def test_session_stays_on_its_version(start_server, redis_store_url, tmp_path):
    app = await start_server(variant_repo(tmp_path, versions={1: "a", 2: "b"}), url=redis_store_url)
    target = f"127.0.0.1:{app.port}"
    (first,) = await exchange(target, [step_request("pinned", 1, X[:1], start=True, version=1)])
    assert first.version == 1
    (unpinned,) = await exchange(target, [step_request("pinned", 2, X[1:2])])  # version 0: the session's own
    assert unpinned.version == 1
    (other,) = await exchange(target, [step_request("pinned", 3, X[2:3], version=2)])
    assert_error(other, grpc.StatusCode.FAILED_PRECONDITION, "pinned to charlm version 1", "send version 0 or 1")
    (fresh,) = await exchange(target, [step_request("new", 1, X[:1], start=True)])
    assert fresh.version == 2  # new sessions start on the newest version
    assert await last_seq(target, "pinned") == 2


async def test_versions_with_the_same_bytes_each_continue_their_sessions(start_server, redis_store_url, tmp_path):
    """An export republishes an unchanged fp32 beside a new int8, so two loaded versions may share their
    bytes: a session pinned to either goes on, and goes on when the other is unloaded."""
    app = await start_server(variant_repo(tmp_path, versions={1: "same", 2: "same"}), url=redis_store_url)
    target = f"127.0.0.1:{app.port}"
    (first,) = await exchange(target, [step_request("s", 1, X[:1], start=True, version=1)])
    assert first.version == 1
    (pinned,) = await exchange(target, [step_request("s", 2, X[1:2], version=1)])
    assert not pinned.HasField("error") and pinned.version == 1
    app.engine.registry.remove(app.engine.registry.find("charlm", 2))
    (after,) = await exchange(target, [step_request("s", 3, X[2:3])])
    assert not after.HasField("error") and after.version == 1
    assert_matches([first, pinned, after], first=1)


async def test_one_file_published_under_two_names_serves_each_name_its_own_sessions(
    start_server, redis_store_url, tmp_path
):
    """The fingerprint is the model file's sha256, so two models may share it (one file published as
    `charlm` and as `twin`): a session belongs to the model it was started on, through the cache and
    through a fresh load alike."""
    import json

    from service.repository import MANIFEST_FILE

    for name in ("charlm", "twin"):
        shutil.copytree(TEST_REPO / "charlm" / "1", tmp_path / name / "1")
        manifest = json.loads((tmp_path / name / "1" / MANIFEST_FILE).read_text())
        (tmp_path / name / "1" / MANIFEST_FILE).write_text(json.dumps(manifest | {"name": name}))
    app = await start_server(tmp_path, url=redis_store_url)
    target = f"127.0.0.1:{app.port}"
    answers = {name: [] for name in ("charlm", "twin")}
    for seq in range(1, 5):
        if seq == 3:  # the next steps judged on records loaded from Redis, not on the cache
            for name in answers:
                app.engine.cache.forget(session_key("rnnserve", name, "s"))
        for name in answers:
            (answer,) = await exchange(target, [step_request("s", seq, X[seq - 1 : seq], model=name, start=seq == 1)])
            assert not answer.HasField("error"), (name, seq, answer.error.message)
            assert (answer.model, answer.seq) == (name, seq)
            answers[name].append(answer)
    for name, got in answers.items():
        assert_matches(got, first=1)
        async with grpc.aio.insecure_channel(target) as channel:
            info = await pb_grpc.RnnServeStub(channel).GetSession(pb.SessionRef(model=name, session_id="s"))
        assert (info.last_seq, info.version) == (4, 1)


async def test_fingerprint_mismatch_is_refused_not_continued(start_server, redis_store_url, tmp_path):
    """A replica serving other weights under the same name and version must not continue the session."""
    old = await start_server(variant_repo(tmp_path / "old", versions={1: "old"}), url=redis_store_url)
    await exchange(f"127.0.0.1:{old.port}", steps("s", 1, 3))
    new = await start_server(variant_repo(tmp_path / "new", versions={1: "new"}), url=redis_store_url)
    target = f"127.0.0.1:{new.port}"
    (refused,) = await exchange(target, steps("s", 4, 4))
    assert_error(refused, grpc.StatusCode.FAILED_PRECONDITION, "has not loaded", "start a new session")
    assert await last_seq(target, "s") == 3
    assert_matches(await exchange(f"127.0.0.1:{old.port}", steps("s", 4, 5)), first=4)


async def test_a_version_one_replica_loaded_first_is_loaded_on_demand_by_the_other(
    start_server, redis_store_url, tmp_path
):
    """After a publish, replicas poll at different moments: a session started on the new version by the
    first replica is continued by the second at once (UNAVAILABLE, retry, then served), never refused as a
    session it can never continue."""
    repo = variant_repo(tmp_path / "repo", versions={1: "a"})
    a = await start_server(repo, url=redis_store_url, model_poll_interval_s=3600)
    b = await start_server(repo, url=redis_store_url, model_poll_interval_s=3600)
    target_a, target_b = f"127.0.0.1:{a.port}", f"127.0.0.1:{b.port}"
    shutil.copytree(variant_repo(tmp_path / "new", versions={2: "b"}) / "charlm" / "2", repo / "charlm" / "2")
    await a.loader.scan()  # A polls first
    first = await exchange(target_a, steps("s", 1, 2))
    assert [r.version for r in first] == [2, 2]
    (waiting,) = await exchange(target_b, steps("s", 3, 3))
    assert_error(waiting, grpc.StatusCode.UNAVAILABLE, "loading now", "retry")
    assert await last_seq(target_a, "s") == 2  # nothing applied
    for _ in range(100):
        (answer,) = await exchange(target_b, steps("s", 3, 3))
        if not answer.HasField("error"):
            break
        assert answer.error.code == grpc.StatusCode.UNAVAILABLE.value[0]
        await asyncio.sleep(0.05)
    assert answer.version == 2 and not answer.replayed
    assert_matches(first + [answer], first=1)
    # The other way round too: the old version stays served where it is pinned.
    assert b.engine.registry.find("charlm", 1) is not None


async def test_a_version_on_disk_that_fails_to_load_is_refused_after_one_try(start_server, redis_store_url, tmp_path):
    repo = variant_repo(tmp_path / "repo", versions={1: "a"})
    a = await start_server(repo, url=redis_store_url, model_poll_interval_s=3600)
    b = await start_server(repo, url=redis_store_url, model_poll_interval_s=3600)
    shutil.copytree(variant_repo(tmp_path / "new", versions={2: "b"}) / "charlm" / "2", repo / "charlm" / "2")
    await a.loader.scan()
    await exchange(f"127.0.0.1:{a.port}", steps("s", 1, 1))
    with (repo / "charlm" / "2" / "model.onnx").open("ab") as model:
        model.write(b"torn")  # the bytes no longer match the fingerprint: B's load refuses them
    for _ in range(100):
        (answer,) = await exchange(f"127.0.0.1:{b.port}", steps("s", 2, 2))
        if answer.error.code != grpc.StatusCode.UNAVAILABLE.value[0]:
            break
        await asyncio.sleep(0.05)
    assert_error(answer, grpc.StatusCode.FAILED_PRECONDITION, "has not loaded", "start a new session")


async def test_a_stray_file_named_like_a_version_does_not_turn_a_refusal_into_a_fault(
    start_server, redis_store_url, tmp_path
):
    repo = variant_repo(tmp_path / "repo", versions={1: "a"})
    a = await start_server(repo, url=redis_store_url, model_poll_interval_s=3600)
    b = await start_server(repo, url=redis_store_url, model_poll_interval_s=3600)
    shutil.copytree(variant_repo(tmp_path / "new", versions={2: "b"}) / "charlm" / "2", repo / "charlm" / "2")
    await a.loader.scan()
    await exchange(f"127.0.0.1:{a.port}", steps("s", 1, 1))  # a session on version 2, which only A loaded
    shutil.rmtree(repo / "charlm" / "2")  # withdrawn from disk
    (repo / "charlm" / "3").write_text("notes")  # and a file where a version directory would go
    (answer,) = await exchange(f"127.0.0.1:{b.port}", steps("s", 2, 2))
    assert_error(answer, grpc.StatusCode.FAILED_PRECONDITION, "has not loaded", "start a new session")


@pytest.mark.parametrize("blob", [b"garbage", b"RNNS" + b"\x01\x00" * 40])
async def test_unparseable_record_is_data_loss(start_server, redis_store_url, blob):
    app = await start_server(url=redis_store_url)
    target = f"127.0.0.1:{app.port}"
    key = session_key("rnnserve", "charlm", "broken")
    with redis.Redis.from_url(redis_store_url) as client:
        client.hset(key, mapping={"token": "1:1", "rec": blob})
        (refused,) = await exchange(target, [step_request("broken", 2, X[1:2])])
        assert_error(refused, grpc.StatusCode.DATA_LOSS, "does not parse", "start the session again")
        assert client.hget(key, "rec") == blob  # left for inspection
    (restarted,) = await exchange(target, steps("broken", 1, 1))
    assert_matches([restarted], first=1)


async def test_a_stale_replica_cannot_apply_a_rival_step(start_server, redis_store_url):
    """Two writers race on seq 4 with different inputs: the loser is told the truth, not 'replayed'."""
    a = await start_server(url=redis_store_url)
    b = await start_server(url=redis_store_url)
    target_a, target_b = f"127.0.0.1:{a.port}", f"127.0.0.1:{b.port}"
    await exchange(target_a, steps("s", 1, 3))  # replica A caches the state at seq 3
    (on_b,) = await exchange(target_b, steps("s", 4, 4))  # B continues from Redis
    rival = step_request("s", 4, X[9:10])  # A believes seq 4 is next: its commit must fail
    for _ in range(2):  # and so must a resend of it: the rival input is never applied, nor replayed
        (refused,) = await exchange(target_a, [rival])
        assert_error(refused, grpc.StatusCode.FAILED_PRECONDITION, "seq 4 was already applied with a different input")
        assert refused.expected_seq == 5
    (twin,) = await exchange(target_a, steps("s", 4, 4))  # B's own step, resent to A: a replay
    assert twin.replayed
    np.testing.assert_array_equal(logits_of(twin), logits_of(on_b))
    assert_matches(await exchange(target_a, steps("s", 5, 7)), first=5)


async def test_store_outage_is_unavailable_and_nothing_acknowledged_is_lost(start_server, persistent_redis):
    app = await start_server(url=persistent_redis.url, redis={"socket_timeout_s": 0.5, "connect_timeout_s": 0.5})
    target = f"127.0.0.1:{app.port}"
    assert_matches(await exchange(target, steps("s", 1, 3)), first=1)
    persistent_redis.stop()
    try:
        (refused,) = await exchange(target, steps("s", 4, 4))
        assert_error(refused, grpc.StatusCode.UNAVAILABLE, "session store unreachable", "retry")
    finally:
        persistent_redis.start()
    assert await last_seq(target, "s") == 3
    assert_matches(await exchange(target, steps("s", 4, 6)), first=4)


async def test_list_models_reports_the_manifest(start_server):
    app = await start_server()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        listing = await pb_grpc.RnnServeStub(channel).ListModels(pb.ListModelsRequest())
    (model,) = listing.models
    assert (model.name, model.version, model.cell, model.streamable) == ("charlm", 1, "lstm", True)
    assert list(model.inputs[0].shape) == [-1, -1, X.shape[1]]
    assert len(model.fingerprint) == 64


async def test_a_session_moves_between_replicas_and_back(start_server, redis_store_url):
    """A's cached copy is stale after B advanced the session: A must consult Redis, not refuse a 'gap'."""
    a = await start_server(url=redis_store_url)
    b = await start_server(url=redis_store_url)
    target_a, target_b = f"127.0.0.1:{a.port}", f"127.0.0.1:{b.port}"
    assert_matches(await exchange(target_a, steps("s", 1, 3)), first=1)
    assert_matches(await exchange(target_b, steps("s", 4, 6)), first=4)
    assert_matches(await exchange(target_a, steps("s", 7, 8)), first=7)
    assert_matches(await exchange(target_a, steps("s", 8, 8)), first=8)  # a retry, judged on Redis's record


async def test_a_resend_applied_elsewhere_is_answered_as_a_replay(start_server, redis_store_url):
    """A gateway resends seq 4 to replica B after losing A's answer; then A's copy arrives: same step."""
    a = await start_server(url=redis_store_url)
    b = await start_server(url=redis_store_url)
    target_a, target_b = f"127.0.0.1:{a.port}", f"127.0.0.1:{b.port}"
    await exchange(target_a, steps("s", 1, 3))  # A caches the state at seq 3
    (on_b,) = await exchange(target_b, steps("s", 4, 4))
    (on_a,) = await exchange(target_a, steps("s", 4, 4))  # A computes it again; its commit meets its twin
    assert on_a.replayed and not on_b.replayed
    np.testing.assert_array_equal(logits_of(on_a), logits_of(on_b))
    assert await last_seq(target_a, "s") == 4
    assert_matches(await exchange(target_a, steps("s", 5, 6)), first=5)


async def test_a_store_that_refuses_a_command_says_so(start_server, redis_store_url):
    """A key of the wrong type is not an outage: that session's record is unreadable (DATA_LOSS, that
    session only), and the answer names what Redis said, for an operator."""
    app = await start_server(url=redis_store_url)
    target = f"127.0.0.1:{app.port}"
    with redis.Redis.from_url(redis_store_url) as client:
        client.rpush(session_key("rnnserve", "charlm", "odd"), b"a list, not a session")
    (refused,) = await exchange(target, steps("odd", 2, 2))
    assert_error(refused, grpc.StatusCode.DATA_LOSS, "something else than a session", "WRONGTYPE")
    (start,) = await exchange(target, steps("odd", 1, 1))  # a start's commit meets it too
    assert_error(start, grpc.StatusCode.UNAVAILABLE, "refused")
    assert "unreachable" not in refused.error.message + start.error.message


async def test_a_resend_is_judged_on_the_store_not_on_a_stale_cache(start_server, redis_store_url):
    """Replica A holds the session at seq 3; it ends at seq 4 on B. A resend of seq 3 to A is not a replay
    any more: the session has ended (A must look, not answer from its copy)."""
    a = await start_server(url=redis_store_url)
    b = await start_server(url=redis_store_url)
    await exchange(f"127.0.0.1:{a.port}", steps("s", 1, 3))
    (ended,) = await exchange(f"127.0.0.1:{b.port}", [step_request("s", 4, X[3:4], end=True)])
    assert not ended.HasField("error")
    (resent,) = await exchange(f"127.0.0.1:{a.port}", steps("s", 3, 3))
    assert_error(resent, grpc.StatusCode.NOT_FOUND, "ended at seq 4")


async def test_a_redis_restart_under_load_fails_fast_and_loses_nothing(start_server, persistent_redis):
    """Redis (append-only file, fsync on every write) stops for two seconds under 20 streaming sessions and
    starts again: steps meanwhile are answered UNAVAILABLE within the socket timeout (no hang), every
    resend after the restart lands once, and no acknowledged step is lost; rnnserve is not restarted."""
    app = await start_server(url=persistent_redis.url, redis={"socket_timeout_s": 0.5, "connect_timeout_s": 0.5})
    text = held_out_text()
    xs = {f"r{i}": one_hot_text(text[i * 30 : i * 30 + 24], vocabulary()) for i in range(20)}
    got: dict[str, list[np.ndarray]] = {sid: [] for sid in xs}
    refusals: list[float] = []  # seconds from a step's send to its UNAVAILABLE
    restarted: list[float] = []
    recovered: list[float] = []
    underway = asyncio.Event()

    async def stream(client: StreamClient, sid: str) -> None:
        session = client.session("charlm", sid)
        for t in range(len(xs[sid])):
            while True:
                sent = time.monotonic()
                try:
                    reply = await session.step(xs[sid][t : t + 1])
                    break
                except StepError as err:
                    assert err.code is grpc.StatusCode.UNAVAILABLE, err
                    refusals.append(time.monotonic() - sent)
                    await asyncio.sleep(0.05)
            if restarted and not recovered:
                recovered.append(time.monotonic())
            got[sid].append(reply.outputs["logits"][0])
            if t == 6:
                underway.set()

    async with StreamClient(f"127.0.0.1:{app.port}") as client:
        streams = asyncio.gather(*(stream(client, sid) for sid in xs))
        await underway.wait()
        persistent_redis.stop()
        await asyncio.sleep(2)
        persistent_redis.start()
        restarted.append(time.monotonic())
        await asyncio.wait_for(streams, 60)
    assert refusals and max(refusals) < 2.0  # bounded by the 0.5 s socket timeout, with room for a busy VM
    for sid, x in xs.items():
        np.testing.assert_allclose(np.stack(got[sid]), offline_logits(TEST_REPO / "charlm" / "1", x), atol=TOLERANCE)
        assert await last_seq(f"127.0.0.1:{app.port}", sid) == len(x)
    print(
        f"redis restart: {len(refusals)} UNAVAILABLE answers, slowest {max(refusals) * 1000:.0f} ms; first step "
        f"landed {(recovered[0] - restarted[0]) * 1000:.0f} ms after Redis answered again"
    )
