"""The session engine: attach, seq / retry / gap checks, version pinning, batched compute, CAS commit.

Knows nothing of gRPC. Semantics (docs: DESIGN.md, "Sessions"):
- seq == last + 1 applies the step; seq == last returns the stored outputs; anything else is refused
  with the expected seq.
- start (seq 1) replaces any earlier session; end applies the step, then deletes the record.
- A session stays on the model version (fingerprint) it started on.
- Every commit is compare-and-set on (epoch, seq), and the response waits for it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import re
import secrets
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from service.batching import Batcher
from service.errors import (
    FailedPrecondition,
    InvalidArgument,
    RecordCorrupt,
    SeqOutOfOrder,
    SessionNotFound,
    Unavailable,
    WriteConflict,
)
from service.metrics import Metrics
from service.models import LoadedModel, ModelRegistry
from service.settings import Settings
from service.state.record import SessionRecord, Tensors, decode, encode
from service.state.store import ABSENT, Commit, Outcome, StateStore, session_key

log = logging.getLogger(__name__)

SESSION_ID_PATTERN = re.compile(r"^[A-Za-z0-9._\-:@/%~]{1,128}$")
SESSION_ID_CHARACTERS = "letters, digits or . _ - ~ : @ / %"


@dataclass(frozen=True, slots=True)
class Step:
    """One request: T >= 1 time steps for one session."""

    model: str
    session_id: str
    seq: int
    x: np.ndarray
    version: int = 0
    start: bool = False
    end: bool = False
    # The server numbers the step (last + 1), for protocols whose clients send no seq (Triton's).
    # A repeated request is then applied again: retries cannot be told from new steps.
    assign_seq: bool = False


@dataclass(frozen=True, slots=True)
class StepResult:
    model: str
    version: int
    session_id: str
    seq: int
    outputs: Tensors
    replayed: bool = False


@dataclass(frozen=True, slots=True)
class SessionInfo:
    model: str
    session_id: str
    version: int | None
    last_seq: int
    fingerprint: str
    ttl_ms: int | None


@dataclass(slots=True)
class _Work:
    key: str
    step: Step
    x: np.ndarray
    states: Tensors
    expected: str
    epoch: int
    enqueued: float
    model: LoadedModel


class SessionEngine:
    def __init__(self, registry: ModelRegistry, store: StateStore, settings: Settings, metrics: Metrics) -> None:
        self.registry = registry
        self._store = store
        self._settings = settings
        self._metrics = metrics
        self._prefix = settings.redis.key_prefix
        self._executor = ThreadPoolExecutor(settings.runtime.executor_threads, thread_name_prefix="runtime")
        self._batchers = {
            (m.name, m.version): Batcher[_Work, StepResult](
                f"{m.name}/{m.version}", functools.partial(self._run_batch, m), settings.batching
            )
            for m in registry.all()
            if m.manifest.streamable
        }
        self._cache: OrderedDict[str, SessionRecord] = OrderedDict()
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    async def start(self) -> None:
        for batcher in self._batchers.values():
            batcher.start()

    async def stop(self) -> None:
        """Finish queued and in-flight steps (their commits included), then release the runtime threads."""
        await asyncio.gather(*(b.stop() for b in self._batchers.values()))
        self._executor.shutdown(wait=True)

    # -- the public operations -----------------------------------------------------------------

    async def step(self, step: Step) -> StepResult:
        started = time.perf_counter()
        _check_session_id(step.session_id)
        if step.assign_seq:
            step = dataclasses.replace(step, seq=1 if step.start else 0)
        elif step.seq < 1:
            raise InvalidArgument(f"seq must be 1 or more, got {step.seq}; number a session's steps 1, 2, 3, ...")
        elif step.start and step.seq != 1:
            raise InvalidArgument(f"a start step must have seq 1, got {step.seq}")
        key = session_key(self._prefix, step.model, step.session_id)
        model = self.registry.get(step.model, step.version)  # NOT_FOUND for an unknown model first
        _check_streamable(model)
        await self._lock(key)
        try:
            prepared = await self._prepare(key, step, model)
        except BaseException:
            self._unlock(key)
            raise
        if isinstance(prepared, StepResult):  # a retry of the last step, answered from the store
            self._unlock(key)
            self._metrics.replays.labels(prepared.model, prepared.version).inc()
            return prepared
        # The session stays locked until this step has landed, even if the caller goes away (a stream
        # cancelled mid-step): the client's resend then finds the step applied instead of racing it.
        landing = asyncio.ensure_future(self._submit(prepared))
        landing.add_done_callback(_retrieve)
        result = await asyncio.shield(landing)
        labels = (result.model, result.version)
        self._metrics.steps.labels(*labels).inc()
        self._metrics.step_latency.labels(*labels).observe(time.perf_counter() - started)
        return result

    async def _prepare(self, key: str, step: Step, model: LoadedModel) -> _Work | StepResult:
        """The work for a step to apply, or the stored answer to a retry; raises for a refused step."""
        if step.start:
            x = self._check_input(model, step.x)
            # Conditional even at a start: a start that arrives late (a resend overtaken by the session's
            # later steps on another replica) must not wipe out what was acknowledged since.
            (current,) = await self._store.tokens([key])
            states = model.zero_states()
            return _Work(key, step, x, states, current or ABSENT, _new_epoch(), time.perf_counter(), model)
        record = await self._attach(key, step)
        if step.assign_seq:
            step = dataclasses.replace(step, seq=record.seq + 1)
        model = self._model_for(record, step)
        x = self._check_input(model, step.x)
        if step.seq == record.seq:
            return StepResult(model.name, model.version, step.session_id, step.seq, record.outputs, True)
        if step.seq != record.seq + 1:
            raise SeqOutOfOrder(step.session_id, step.seq, record.seq + 1)
        return _Work(key, step, x, record.states, record.token, record.epoch, time.perf_counter(), model)

    async def _submit(self, work: _Work) -> StepResult:
        try:
            return await self._batchers[(work.model.name, work.model.version)].submit(work)
        finally:
            self._unlock(work.key)

    async def infer(self, model_name: str, version: int, x: np.ndarray) -> tuple[LoadedModel, Tensors]:
        """Whole sequences x [B, T, F], each from a fresh state; no session is kept. Outputs [B, T, ...]."""
        model = self.registry.get(model_name, version)
        limit = self._settings.batching.max_batch_size
        if x.ndim != 3 or not 1 <= x.shape[0] <= limit:
            raise InvalidArgument(
                f"input must be [B, T, {model.manifest.features}] with 1 <= B <= {limit} sequences "
                f"for {model.name}/{model.version}, got {list(x.shape)}"
            )
        x = np.stack([self._check_input(model, sequence) for sequence in x])
        loop = asyncio.get_running_loop()
        batch = len(x)
        states = {name: np.repeat(value[None], batch, axis=0) for name, value in model.zero_states().items()}
        outputs, _ = await loop.run_in_executor(self._executor, model.runtime.run, x, states)
        return model, outputs

    async def get_session(self, model_name: str, session_id: str) -> SessionInfo:
        _check_session_id(session_id)
        key = session_key(self._prefix, model_name, session_id)
        (blob,) = await self._store.load_many([key])
        ttl_ms = await self._store.ttl_ms(key)
        if blob is None or ttl_ms is None:
            raise SessionNotFound(_not_found_message(model_name, session_id))
        record = decode(blob, what=f"session {session_id!r}")
        model = self.registry.by_fingerprint(record.fingerprint)
        return SessionInfo(
            model_name,
            session_id,
            model.version if model else None,
            record.seq,
            record.fingerprint.hex(),
            ttl_ms,
        )

    async def delete_session(self, model_name: str, session_id: str) -> bool:
        _check_session_id(session_id)
        key = session_key(self._prefix, model_name, session_id)
        await self._lock(key)
        try:
            self._forget(key)
            return await self._store.delete(key)
        finally:
            self._unlock(key)

    # -- attach and check ----------------------------------------------------------------------

    async def _attach(self, key: str, step: Step) -> SessionRecord:
        """The session's record: from this replica's cache when it can apply the step, else the store.

        Anything but a plain next step (a retry, a gap) is judged on a fresh load: the cache may be stale.
        """
        cached = self._cache.get(key)
        if cached is not None and (step.seq == cached.seq + 1 or step.assign_seq):
            self._cache.move_to_end(key)
            return cached
        started = time.perf_counter()
        (blob,) = await self._store.load_many([key])
        self._metrics.store_load_latency.observe(time.perf_counter() - started)
        if blob is None:
            self._forget(key)
            self._metrics.expired.inc()
            raise SessionNotFound(_not_found_message(step.model, step.session_id))
        record = decode(blob, what=f"session {step.session_id!r}")
        self._remember(key, record)
        return record

    def _model_for(self, record: SessionRecord, step: Step) -> LoadedModel:
        model = self.registry.by_fingerprint(record.fingerprint)
        if model is None:
            raise FailedPrecondition(
                f"session {step.session_id!r} was started on a model version (fingerprint "
                f"{record.fingerprint.hex()[:12]}) this server has not loaded; start a new session"
            )
        if model.name != step.model:
            raise RecordCorrupt(f"the stored session {step.session_id!r} belongs to model {model.name!r}")
        if step.version not in (0, model.version):
            raise FailedPrecondition(
                f"session {step.session_id!r} is pinned to {model.name} version {model.version}, "
                f"the step asked for version {step.version}; send version 0 or {model.version}"
            )
        for spec in model.manifest.state:
            state = record.states.get(spec.input)
            if state is None or list(state.shape) != spec.shape[1:]:
                raise RecordCorrupt(f"the stored session {step.session_id!r} does not fit its model's state")
        return model

    def _check_input(self, model: LoadedModel, x: np.ndarray) -> np.ndarray:
        features = model.manifest.features
        limit = self._settings.sessions.max_chunk_steps
        if x.ndim != 2 or x.shape[1] != features or not 1 <= x.shape[0] <= limit:
            raise InvalidArgument(
                f"input must be [T, {features}] with 1 <= T <= {limit} for {model.name}/{model.version}, "
                f"got {list(x.shape)}"
            )
        if not np.isfinite(x).all():
            bad = int(np.argwhere(~np.isfinite(x))[0][0])
            raise InvalidArgument(f"input has NaN or Inf at time step {bad}; send finite values")
        return x.astype(np.float32, copy=False)

    # -- the batch path ------------------------------------------------------------------------

    async def _run_batch(self, model: LoadedModel, works: list[_Work]) -> list[StepResult | BaseException]:
        labels = (model.name, model.version)
        now = time.perf_counter()
        for work in works:
            self._metrics.queue_wait.labels(*labels).observe(now - work.enqueued)
        self._metrics.batch_size.labels(*labels).observe(len(works))
        loop = asyncio.get_running_loop()
        records, blobs, seconds = await loop.run_in_executor(self._executor, _compute, model, works)
        self._metrics.runtime_latency.labels(*labels).observe(seconds)
        commits = [
            Commit(w.key, w.expected, r.token, blob, delete=w.step.end)
            for w, r, blob in zip(works, records, blobs, strict=True)
        ]
        started = time.perf_counter()
        try:
            outcomes = await self._store.commit_many(commits, self._settings.sessions.state_ttl_s)
        except BaseException:
            for work in works:  # the outcome is unknown: the next step reloads
                self._forget(work.key)
            raise
        self._metrics.store_commit_latency.observe(time.perf_counter() - started)
        results: list[StepResult | BaseException] = []
        for work, record, outcome in zip(works, records, outcomes, strict=True):
            step = work.step
            if outcome.outcome is Outcome.CONFLICT and outcome.current == record.token and not step.end:
                # This seq already landed through another writer (a resend that reached another replica
                # first). The same step computes the same outputs: then it is a retry after all.
                stored = await self._stored_answer(model, work, record)
                if stored is not None:
                    results.append(stored)
                    continue
            if outcome.outcome is Outcome.ERROR:
                self._forget(work.key)
                results.append(Unavailable(f"session store refused the commit ({outcome.current}); retry"))
                continue
            if outcome.outcome is Outcome.OK:
                if step.end:
                    self._forget(work.key)
                else:
                    self._remember(work.key, record)
                results.append(StepResult(model.name, model.version, step.session_id, step.seq, record.outputs))
                continue
            self._forget(work.key)
            if outcome.outcome is Outcome.MISSING:
                self._metrics.expired.inc()
                results.append(SessionNotFound(_not_found_message(step.model, step.session_id)))
            else:
                self._metrics.conflicts.inc()
                now_at = (outcome.current or "").rpartition(":")[2] or "?"
                results.append(
                    WriteConflict(
                        f"session {step.session_id!r} was changed by another writer (its store entry is now "
                        f"at seq {now_at}); seq {step.seq} was not applied. Send seq {step.seq} again"
                    )
                )
        return results

    async def _stored_answer(self, model: LoadedModel, work: _Work, ours: SessionRecord) -> StepResult | None:
        """The stored answer if the stored step is this very step (same outputs), else None."""
        (blob,) = await self._store.load_many([work.key])
        if blob is None:
            return None
        stored = decode(blob, what=f"session {work.step.session_id!r}")
        same = stored.outputs.keys() == ours.outputs.keys() and all(
            np.array_equal(stored.outputs[name], ours.outputs[name]) for name in ours.outputs
        )
        if not same:
            return None
        self._remember(work.key, stored)
        step = work.step
        return StepResult(model.name, model.version, step.session_id, step.seq, stored.outputs, True)

    # -- cache and ordering --------------------------------------------------------------------

    def _remember(self, key: str, record: SessionRecord) -> None:
        limit = self._settings.sessions.cache_max_sessions
        if limit == 0:
            return
        self._cache[key] = record
        self._cache.move_to_end(key)
        while len(self._cache) > limit:
            self._cache.popitem(last=False)
        self._metrics.active_sessions.set(len(self._cache))

    def _forget(self, key: str) -> None:
        if self._cache.pop(key, None) is not None:
            self._metrics.active_sessions.set(len(self._cache))

    async def _lock(self, key: str) -> None:
        """Steps of one session run one at a time, in arrival order (asyncio.Lock is FIFO)."""
        lock, users = self._locks.get(key) or (asyncio.Lock(), 0)
        self._locks[key] = (lock, users + 1)
        try:
            await lock.acquire()
        except BaseException:
            self._release_user(key)
            raise

    def _unlock(self, key: str) -> None:
        self._locks[key][0].release()
        self._release_user(key)

    def _release_user(self, key: str) -> None:
        lock, users = self._locks[key]
        if users == 1:
            del self._locks[key]
        else:
            self._locks[key] = (lock, users - 1)


def _retrieve(task: asyncio.Future[StepResult]) -> None:
    """A step whose caller went away still ends; its exception is noted here so asyncio does not warn."""
    if not task.cancelled():
        task.exception()


def _compute(model: LoadedModel, works: list[_Work]) -> tuple[list[SessionRecord], list[bytes], float]:
    """Runs in a runtime thread: one runtime call per distinct T, then each session's new record."""
    started = time.perf_counter()
    by_length: dict[int, list[int]] = {}
    for i, work in enumerate(works):
        by_length.setdefault(work.x.shape[0], []).append(i)
    outputs: list[Tensors] = [{} for _ in works]
    states: list[Tensors] = [{} for _ in works]
    for members in by_length.values():
        x = np.stack([works[i].x for i in members])
        batch_states = {name: np.stack([works[i].states[name] for i in members]) for name in works[0].states}
        out, new_states = model.runtime.run(x, batch_states)
        for row, i in enumerate(members):
            outputs[i] = {name: value[row] for name, value in out.items()}
            states[i] = {name: value[row] for name, value in new_states.items()}
    seconds = time.perf_counter() - started
    records = [
        SessionRecord(model.fingerprint, w.epoch, w.step.seq, states[i], outputs[i]) for i, w in enumerate(works)
    ]
    return records, [encode(r) for r in records], seconds


def _new_epoch() -> int:
    return secrets.randbits(63) | 1


def _check_session_id(session_id: str) -> None:
    if not SESSION_ID_PATTERN.match(session_id):
        raise InvalidArgument(f"session id {session_id[:140]!r} is invalid: use 1 to 128 {SESSION_ID_CHARACTERS}")


def _check_streamable(model: LoadedModel) -> None:
    if not model.manifest.streamable:
        raise FailedPrecondition(
            f"{model.name}/{model.version} is bidirectional and needs the whole sequence in one request: "
            "send it without a session (Infer, or ModelInfer without sequence_id)"
        )


def _not_found_message(model: str, session_id: str) -> str:
    return (
        f"session {session_id!r} of model {model!r} has expired or was never started; "
        "start it again with start=true and seq=1"
    )
