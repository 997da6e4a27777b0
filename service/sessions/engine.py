"""The session engine's public operations: step, infer, get and delete a session.

Knows nothing of gRPC. The contract is in `rules.py`, the batch path in `batch.py`. A step is checked
(what needs no store), then waits its session's turn on this replica, joins its model's batch, and is
answered once its state is committed. Every commit is compare-and-set, so replicas need no coordination.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
import secrets
import time
from collections.abc import Callable, Coroutine, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

import numpy as np

from service.batching import Batcher, settle
from service.errors import (
    FailedPrecondition,
    InvalidArgument,
    Overloaded,
    RecordCorrupt,
    RnnServeError,
    SessionEnded,
    SessionNotFound,
    Unavailable,
)
from service.metrics import Metrics
from service.models import LoadedModel, ModelRegistry
from service.sessions.batch import BatchPipeline, Pending, check_input
from service.sessions.cache import RecordCache, SessionTurns
from service.sessions.rules import Ask, input_digest
from service.sessions.steps import Answer, SessionInfo, Step, StepResult
from service.settings import Settings
from service.state.record import Tensors, decode
from service.state.store import StateStore, live_sessions_key, session_key

log = logging.getLogger(__name__)

SESSION_ID_PATTERN = re.compile(r"[A-Za-z0-9._\-:@/%~]{1,128}")  # the whole id: fullmatch
SESSION_ID_CHARACTERS = "letters, digits or . _ - ~ : @ / %"


class SessionEngine:
    def __init__(self, registry: ModelRegistry, store: StateStore, settings: Settings, metrics: Metrics) -> None:
        self.registry = registry
        self._store = store
        self._settings = settings
        self._prefix = settings.redis.key_prefix
        self._executor = ThreadPoolExecutor(settings.runtime.executor_threads, thread_name_prefix="runtime")
        self.cache = RecordCache(settings.sessions.cache_max_sessions)
        self._turns = SessionTurns()
        self._pending = 0  # steps taken and not yet landed
        # Steps whose session's turn came in this pass of the event loop, by the callback they land with
        # (one per message): handed to the batcher together at the end of the pass.
        self._turned: dict[Callable[[int, Answer], None], tuple[list[int], list[Pending]]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping = False
        self._pipeline = BatchPipeline(registry, store, self.cache, self._executor, settings, metrics)
        # One batcher for every model: a batch of many models' steps still makes one store read and one
        # commit (the pipeline makes one runtime call per model version and chunk length).
        self._batcher = Batcher[Pending, StepResult]("steps", self._pipeline.run, settings.batching)

    async def start(self) -> None:
        self._batcher.start()

    @property
    def sessions_in_flight(self) -> int:
        """Sessions with a step taken and not yet landed on this replica."""
        return len(self._turns)

    @property
    def steps_in_flight(self) -> int:
        """Steps taken and not yet landed on this replica (bounded by `batching.max_pending_steps`)."""
        return self._pending

    async def stop(self, timeout_s: float | None = None) -> None:
        """Finish queued and in-flight steps (their commits included), then release the runtime threads.
        Past `timeout_s` (a store that does not answer), the steps left are answered UNAVAILABLE. A
        DeleteSession whose turn comes from now on is refused UNAVAILABLE, as a step is."""
        self._stopping = True
        abandoned = await self._batcher.stop(timeout_s)
        if abandoned:
            log.warning(
                "%d steps had not landed when the shutdown grace ran out; given up (each may or may not have "
                "been applied: a resend settles it)",
                abandoned,
            )
        # Steps (and deletes) still waiting their session's turn get it as the ones before them land, one a
        # loop pass, and each is refused: all answered before the engine says it has stopped. Bounded: about
        # 7 us a waiting step, 0.5 s for the most a replica holds (`batching.max_pending_steps`); a delete
        # already at the store when the stop began finishes within the store's socket timeout.
        try:
            async with asyncio.timeout(STOP_SETTLE_S):
                while self._pending or self._tasks:
                    await asyncio.sleep(0 if self._pending else 0.001)
        except TimeoutError:
            log.warning(
                "%d steps and %d deletes were still waiting their session's turn when the engine stopped",
                self._pending,
                len(self._tasks),
            )
        self._executor.shutdown(wait=True)

    # -- the public operations -----------------------------------------------------------------

    def submit(self, step: Step) -> asyncio.Future[StepResult]:
        """Start a step; its future gets the result, or the error that refused it.

        The step waits its session's turn on this replica, and the session's next step waits until this
        one has landed (committed or failed) — even if the caller cancels the future and goes away (a
        stream cancelled mid-step): a resend then finds the step applied instead of racing it.
        """
        future: asyncio.Future[StepResult] = asyncio.get_running_loop().create_future()
        self._start([step], lambda _, answer: settle(future, answer))
        return future

    def submit_many(self, steps: Sequence[Step | BaseException]) -> asyncio.Future[list[Answer]]:
        """Start every step at once, as `submit` does each (they join the same batches); one future, done
        once every step has landed, holding each step's result or error in the order given. An item that
        is an exception (a request that did not parse) is answered with itself.

        One future and one callback per call, not per step: what a message of many sessions' steps costs
        on the event loop is mostly per-step objects."""
        together: asyncio.Future[list[Answer]] = asyncio.get_running_loop().create_future()
        answers: list[Answer] = [Unavailable("not landed")] * len(steps)  # each replaced as its step lands
        remaining = len(answers)

        def land(i: int, answer: Answer) -> None:
            nonlocal remaining
            answers[i] = answer
            remaining -= 1
            if remaining == 0 and not together.done():
                together.set_result(answers)

        if not answers:
            together.set_result(answers)
        self._start(steps, land)
        return together

    async def step(self, step: Step) -> StepResult:
        return await self.submit(step)

    def _start(self, steps: Sequence[Step | BaseException], done: Callable[[int, Answer], None]) -> None:
        """Admit `steps` and give each its session's turn; `done(i, answer)` once steps[i] has landed.

        The steps whose sessions have no step in flight here go to the batcher together, as one group;
        each of the others joins its session's line, and goes when its turn comes, with the other steps of
        its message whose turns came in the same pass of the event loop (`_turn_came`)."""
        limit = self._settings.batching.max_pending_steps
        now: list[int] = []
        ready: list[Pending] = []
        for i, pending in enumerate(self._admit_many(steps)):
            if isinstance(pending, BaseException):
                done(i, pending)
            elif self._pending >= limit:  # memory stays bounded however many steps clients pipeline
                why = f"this replica has {limit} steps in flight; back off and retry, or use another replica"
                done(i, Overloaded(why))
            else:
                self._pending += 1
                if self._turns.claim(pending.key):
                    now.append(i)
                    ready.append(pending)
                else:
                    self._turns.wait(pending.key, partial(self._turn_came, i, pending, done))
        if ready:
            self._dispatch(now, ready, done)

    def _turn_came(self, i: int, pending: Pending, done: Callable[[int, Answer], None]) -> None:
        """Step `i` of a message (`done`'s) holds its session's turn now. A gateway that sends a message
        before the last one for the same sessions is answered has all of its steps waiting, and their
        turns come together as the last message lands: they go to the batcher as one group, not one by one
        (a group per step cost the event loop more than the step)."""
        if not self._turned:
            asyncio.get_running_loop().call_soon(self._dispatch_turned)
        indices, group = self._turned.setdefault(done, ([], []))
        indices.append(i)
        group.append(pending)

    def _dispatch_turned(self) -> None:
        turned, self._turned = self._turned, {}
        for done, (indices, group) in turned.items():
            self._dispatch(indices, group, done)

    def _dispatch(self, indices: list[int], group: list[Pending], done: Callable[[int, Answer], None]) -> None:
        """`group` (steps holding their sessions' turns) to the batcher; each step's turn ends as it lands."""

        def landed(first: int, answers: list[Answer]) -> None:
            for j, answer in enumerate(answers, first):
                self._pending -= 1
                try:
                    done(indices[j], answer)
                except Exception:  # one caller's failure must not keep the other sessions' turns
                    log.exception("answering a step failed")
                finally:  # the session's next step must get its turn whatever happened to this answer
                    self._turns.leave(group[j].key)

        self._batcher.put_many(group, landed)

    def _admit_many(self, steps: Sequence[Step | BaseException]) -> list[Pending | BaseException]:
        """Each step admitted (everything that can be checked without the store), or what refused it.

        What depends only on the model (is it served, does it take steps) is looked up once per
        model in the call, and finiteness is checked for all the inputs of one width at once: per step,
        each cost more than the rest of admission."""
        checked: list[tuple[Step, LoadedModel, np.ndarray] | BaseException] = []
        widths: dict[int, list[int]] = {}
        models: dict[tuple[str, int], LoadedModel] = {}
        max_steps = self._settings.sessions.max_chunk_steps
        for step in steps:
            if isinstance(step, BaseException):
                checked.append(step)
                continue
            try:
                _check_step(step)
                model = models.get((step.model, step.version))
                if model is None:
                    model = models[step.model, step.version] = self._model_for(step)
                x = check_input(model, step.x, max_steps)
                if step.start_id < 0 or step.start_id >= 1 << 64:
                    raise InvalidArgument(f"start_id must fit an unsigned 64-bit integer, got {step.start_id}")
            except RnnServeError as err:
                checked.append(err)
                continue
            widths.setdefault(x.shape[1], []).append(len(checked))
            checked.append((step, model, x))
        for members in widths.values():
            inputs = [checked[i][2] for i in members]  # type: ignore[index]
            if not np.isfinite(np.concatenate(inputs) if len(inputs) > 1 else inputs[0]).all():
                for i in members:  # rare: find which
                    if (bad := _non_finite(checked[i][2])) is not None:  # type: ignore[index]
                        checked[i] = bad
        now = time.perf_counter()  # they came together
        return [item if isinstance(item, BaseException) else self._pending_of(*item, now) for item in checked]

    def _model_for(self, step: Step) -> LoadedModel:
        """The version `step` names (NOT_FOUND for an unknown model), if it can take steps."""
        model = self.registry.get(step.model, step.version)
        _check_streamable(model)
        return model

    def _pending_of(self, step: Step, model: LoadedModel, x: np.ndarray, enqueued: float) -> Pending:
        ask = Ask(step.session_id, step.seq, step.start, step.end, step.start_id, input_digest(x, step.end))
        key = session_key(self._prefix, step.model, step.session_id, step.tenant)
        return Pending(step, key, ask, _new_epoch() if step.start else 0, model, enqueued, x)

    async def infer(self, model_name: str, version: int, x: np.ndarray) -> tuple[LoadedModel, Tensors]:
        """Whole sequences x [B, T, F], each from a fresh state; no session is kept. Outputs [B, T, ...]."""
        model = self.registry.get(model_name, version)
        limit = self._settings.batching.max_batch_size
        if x.ndim != 3 or not 1 <= x.shape[0] <= limit:
            raise InvalidArgument(
                f"input must be [B, T, {model.manifest.features}] with 1 <= B <= {limit} sequences "
                f"for {model.name}/{model.version}, got {list(x.shape)}"
            )
        chunk_limit = self._settings.sessions.max_chunk_steps
        x = np.stack([check_input(model, sequence, chunk_limit) for sequence in x])
        if not np.isfinite(x).all():
            raise InvalidArgument("input has NaN or Inf; send finite values")
        loop = asyncio.get_running_loop()
        batch = len(x)
        states = {name: np.repeat(value[None], batch, axis=0) for name, value in model.zero_states().items()}
        outputs, _ = await loop.run_in_executor(self._executor, model.runtime.run, x, states)
        return model, outputs

    async def get_session(self, model_name: str, session_id: str, tenant: str = "") -> SessionInfo:
        key = self._session_key(model_name, session_id, tenant)
        (stored,) = await self._store.load_many([key])
        if isinstance(stored, RecordCorrupt):
            raise stored
        ttl_ms = await self._store.ttl_ms(key)
        if stored is None or ttl_ms is None:
            raise SessionNotFound(f"session {session_id!r} of model {model_name!r} has expired or was never started")
        record = decode(stored.record, what=f"session {session_id!r}")
        if record.ended:
            raise SessionEnded(f"session {session_id!r} of model {model_name!r} ended at seq {record.seq}")
        model = self.registry.by_fingerprint(model_name, record.fingerprint)
        return SessionInfo(
            model_name,
            session_id,
            model.version if model else None,
            record.seq,
            record.fingerprint.hex(),
            ttl_ms,
            record.start_id,
        )

    async def delete_session(self, model_name: str, session_id: str, tenant: str = "") -> bool:
        """Delete a session in its turn: after the steps before it, before the steps after it."""
        key = self._session_key(model_name, session_id, tenant)
        live = live_sessions_key(self._prefix, tenant) if tenant and self._settings.auth.max_sessions_per_tenant else ""
        deleted: asyncio.Future[bool] = asyncio.get_running_loop().create_future()

        async def delete() -> None:
            try:
                if self._stopping:
                    settle(deleted, Unavailable("the server is stopping; send the delete to another replica"))
                    return
                self.cache.forget(key)
                settle(deleted, await self._store.delete(key, live))
            except asyncio.CancelledError as err:
                settle(deleted, err)
                raise
            except Exception as err:  # noqa: BLE001 - the caller's to report; re-raised, it was logged as lost
                settle(deleted, err)
            finally:
                self._turns.leave(key)

        self._turns.enter(key, lambda: self._background(delete()))
        return await deleted

    def _background(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _session_key(self, model_name: str, session_id: str, tenant: str) -> str:
        _check_session_id(session_id)
        self.registry.get(model_name)  # NOT_FOUND for a model this server does not serve
        return session_key(self._prefix, model_name, session_id, tenant)


# The most `stop` waits for the steps and deletes in session lines to be answered once the batcher has stopped.
STOP_SETTLE_S = 5.0

# Epochs need to be unpredictable across processes, not secret: seeded once from the OS, then cheap (a
# draw from os.urandom on every start showed up in profiles).
_EPOCHS = random.Random(secrets.randbits(128))


def _new_epoch() -> int:
    return _EPOCHS.getrandbits(63) | 1


def _check_step(step: Step) -> None:
    """The session id and seq, checked before the model (a malformed step is refused as such first)."""
    _check_session_id(step.session_id)
    if step.seq is not None:
        if step.seq < 1:
            raise InvalidArgument(f"seq must be 1 or more, got {step.seq}; number a session's steps 1, 2, 3, ...")
        if step.start and step.seq != 1:
            raise InvalidArgument(f"a start step must have seq 1, got {step.seq}")


def _check_session_id(session_id: str) -> None:
    if not SESSION_ID_PATTERN.fullmatch(session_id):
        raise InvalidArgument(f"session id {session_id[:140]!r} is invalid: use 1 to 128 {SESSION_ID_CHARACTERS}")


def _non_finite(x: np.ndarray) -> InvalidArgument | None:
    """The refusal of an input holding NaN or Inf, checked value by value (not by a cheaper sum: one past
    float32's range, or of +Inf and -Inf, warns, and a warning must never come of what a client sends)."""
    finite = np.isfinite(x)
    if finite.all():
        return None
    bad = int(np.argwhere(~finite)[0][0])
    return InvalidArgument(f"input has NaN or Inf at time step {bad}; send finite values")


def _check_streamable(model: LoadedModel) -> None:
    if not model.manifest.streamable:
        raise FailedPrecondition(
            f"{model.name}/{model.version} is bidirectional and needs the whole sequence in one request: "
            "send it without a session (Infer, or ModelInfer without sequence_id)"
        )
