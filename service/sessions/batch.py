"""The batch pipeline: one batch of steps (at most one per session), end to end.

    plan     judge each step on its cached record (only a plain next step may go ahead on the cache) or
             on a fresh load: the misses of the whole batch are read in one pipelined round trip
    compute  one runtime call per model version and chunk length, off the event loop
    commit   every applied step's record in one pipelined round trip, compare-and-set on its token
    answer   each step on its own: a refusal or failure of one never fails its neighbours

A step whose commit meets another writer's record (conflict, or the record gone) is judged again on a
fresh load, for a bounded number of rounds: it may turn out to be a resend that another replica applied
(a replay), a step on a session that moved on (applied now on the new record, or refused), or a start
over a session that vanished (applied on nothing). It is answered as applied only when it was.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np

from service.errors import (
    FailedPrecondition,
    InvalidArgument,
    Overloaded,
    RecordCorrupt,
    RnnServeError,
    SessionEnded,
    SessionNotFound,
    StoreRefused,
    Unavailable,
    WriteConflict,
)
from service.metrics import Metrics, observe_many
from service.models import LoadedModel, ModelRegistry
from service.sessions.cache import RecordCache
from service.sessions.rules import Apply, Ask, Replay, judge, plain_next
from service.sessions.steps import Answer, Step, StepResult
from service.settings import Settings
from service.state.record import SessionRecord, Tensors, decode, encode_rows, stack_states
from service.state.store import Commit, Outcome, StateStore, Stored, live_sessions_key

log = logging.getLogger(__name__)

# Rounds of judge -> compute -> commit a step gets before it is refused as ABORTED (another writer keeps
# moving its session on).
MAX_ROUNDS = 3


@dataclass(slots=True)
class Pending:
    """A step waiting in (or going through) a batch."""

    step: Step
    key: str
    ask: Ask
    epoch: int  # the epoch a start of this step gets; drawn once, so every round agrees
    admitted: LoadedModel  # the version the step named (the newest for 0), for the queue's metrics
    enqueued: float
    x: np.ndarray  # the step's input, checked against `admitted` (float32 [T, F])
    fresh: bool = False  # judge on a fresh load, not on the cache


@dataclass(slots=True)
class _Planned:
    apply: Apply
    model: LoadedModel
    x: np.ndarray


class BatchPipeline:
    def __init__(
        self,
        registry: ModelRegistry,
        store: StateStore,
        cache: RecordCache,
        executor: Executor,
        settings: Settings,
        metrics: Metrics,
    ) -> None:
        self._registry = registry
        self._store = store
        self._cache = cache
        self._executor = executor
        self._settings = settings
        self._metrics = metrics

    async def run(self, items: list[Pending]) -> list[Answer]:
        now = time.perf_counter()
        waits: dict[tuple[str, int], list[float]] = {}
        for item in items:
            waits.setdefault((item.admitted.name, item.admitted.version), []).append(now - item.enqueued)
        for (name, version), seconds in waits.items():
            observe_many(self._metrics.model(name, version).queue_wait, seconds)
        answers: list[Answer | None] = [None] * len(items)
        replays: dict[int, tuple[str, str]] = {}  # step -> (key, token) of the record it was answered from
        todo = list(range(len(items)))
        for _ in range(MAX_ROUNDS):
            plans = await self._plan(items, todo, answers, replays)
            records = await self._compute(plans, items, answers)
            todo = await self._commit(items, plans, records, answers)
            if not todo:
                break
        for i in todo:
            step = items[i].step
            answers[i] = WriteConflict(
                f"session {step.session_id!r} kept being changed by another writer; this step was not "
                "applied. Send it again"
            )
        await self._confirm_replays(replays, answers)
        self._metrics.active_sessions.set(len(self._cache))
        assert all(a is not None for a in answers)
        self._record(items, answers)  # type: ignore[arg-type]
        return answers  # type: ignore[return-value]

    async def _confirm_replays(self, replays: dict[int, tuple[str, str]], answers: list[Answer | None]) -> None:
        """A replay acknowledges a record this batch did not write (a lost answer's, perhaps not yet
        replicated): it is answered only once the store shows it holds that record as durably as a commit."""
        if not replays:
            return
        try:
            await self._store.confirm_replicated(list(replays.values()))
        except RnnServeError as err:
            for i in replays:
                answers[i] = err

    def _record(self, items: list[Pending], answers: list[Answer]) -> None:
        """The batch's steps in the metrics: a few writes per model version, not several per step."""
        now = time.perf_counter()
        landed: dict[tuple[str, int], tuple[list[float], list[bool]]] = {}
        expired = 0
        for item, answer in zip(items, answers, strict=True):
            if isinstance(answer, StepResult):
                seconds, replays = landed.setdefault((answer.model, answer.version), ([], []))
                seconds.append(now - item.enqueued)
                replays.append(answer.replayed)
            elif isinstance(answer, SessionNotFound) and not isinstance(answer, SessionEnded):
                expired += 1
        for (name, version), (seconds, replays) in landed.items():
            series = self._metrics.model(name, version)
            observe_many(series.step_latency, seconds)
            replayed = sum(replays)
            if replayed:
                series.replays.inc(replayed)
            if replayed < len(replays):
                series.steps.inc(len(replays) - replayed)
        if expired:
            self._metrics.expired.inc(expired)

    # -- plan ------------------------------------------------------------------------------------

    async def _plan(
        self,
        items: list[Pending],
        todo: list[int],
        answers: list[Answer | None],
        replays: dict[int, tuple[str, str]],
    ) -> dict[int, _Planned]:
        plans: dict[int, _Planned] = {}
        to_load: list[int] = []
        known: dict[tuple[str, bytes, int], LoadedModel] = {}
        for i in todo:
            item = items[i]
            if not item.fresh:
                cached = self._cache.get(item.key)
                if cached is not None and plain_next(item.ask, cached):  # most steps: judged at less cost
                    self._settle(i, item, Apply(cached.seq + 1, cached, cached.token), plans, answers, replays, known)
                    continue
                if cached is not None or item.ask.start:
                    # A start on no cached record assumes none is stored: its commit says otherwise.
                    verdict = judge(item.ask, cached.token if cached else None, cached, item.step.model)
                    if isinstance(verdict, Apply):
                        self._settle(i, item, verdict, plans, answers, replays, known)
                        continue
            to_load.append(i)
        if not to_load:
            return plans
        started = time.perf_counter()
        try:
            loaded = await self._store.load_many([items[i].key for i in to_load])
        except RnnServeError as err:
            for i in to_load:
                self._cache.forget(items[i].key)
                answers[i] = err
            return plans
        self._metrics.store_load_latency.observe(time.perf_counter() - started)
        known.clear()  # the models served may have changed while the store answered
        for i, stored in zip(to_load, loaded, strict=True):
            item = items[i]
            record = self._read(item, stored)
            token = stored.token if isinstance(stored, Stored) else None
            verdict = judge(item.ask, token, record, item.step.model)
            self._settle(i, item, verdict, plans, answers, replays, known)
        return plans

    def _read(self, item: Pending, stored: Stored | None | RecordCorrupt) -> SessionRecord | RecordCorrupt | None:
        if not isinstance(stored, Stored):
            self._cache.forget(item.key)
            return stored
        try:
            record = decode(stored.record, what=f"session {item.step.session_id!r}")
            checked = self._check_fits(record, item)
        except RecordCorrupt as err:
            self._cache.forget(item.key)
            return err
        if checked:
            self._cache.remember(item.key, record)
        return record

    def _check_fits(self, record: SessionRecord, item: Pending) -> bool:
        """A record read from the store must fit its model's state (names, shapes, dtype); records this
        replica made itself do, so a cached one is not checked again. False: it cannot be checked (its
        version is not loaded here), so it is not cached either."""
        model = self._registry.by_fingerprint(item.step.model, record.fingerprint)
        if model is None:
            return False  # refused when planned: the version is not loaded
        if record.ended:
            return True  # a tombstone has no state
        states = record.states
        fits = len(states) == len(model.state_layout) and all(
            (state := states.get(name)) is not None and state.shape == shape and state.dtype == dtype
            for name, shape, dtype in model.state_layout
        )
        if not fits:
            raise RecordCorrupt(
                f"the stored session {item.step.session_id!r} does not fit its model's state; start it again"
            )
        return True

    def _settle(
        self,
        i: int,
        item: Pending,
        verdict: Apply | Replay | RnnServeError,
        plans: dict[int, _Planned],
        answers: list[Answer | None],
        replays: dict[int, tuple[str, str]],
        known: dict[tuple[str, bytes, int], LoadedModel],
    ) -> None:
        """Record the verdict: a plan to apply, or the answer (a replay or a refusal). `known`: the model
        versions this batch's records were found to run on so far."""
        step = item.step
        try:
            if isinstance(verdict, RnnServeError):
                raise verdict
            if isinstance(verdict, Replay):
                model = self._model_of(verdict.record, step, known)
                answers[i] = StepResult(
                    model.name, model.version, step.session_id, verdict.record.seq, verdict.record.outputs, True
                )
                replays[i] = (item.key, verdict.record.token)
                return
            if verdict.base is None:
                model = self._registry.get(step.model, step.version)
            else:
                model = self._model_of(verdict.base, step, known)
            x = item.x  # checked against the admitted version; once more against another (the session's own)
            if model is not item.admitted:
                x = check_input(model, step.x, self._settings.sessions.max_chunk_steps)
            plans[i] = _Planned(verdict, model, x)
        except RnnServeError as err:
            answers[i] = err

    def _model_of(
        self, record: SessionRecord, step: Step, known: dict[tuple[str, bytes, int], LoadedModel]
    ) -> LoadedModel:
        """The loaded version a stored session runs on, checked against the step and the record; looked up
        once per batch (`known`) for the sessions of one version."""
        model = known.get(found := (step.model, record.fingerprint, step.version))
        if model is None:
            model = self._registry.by_fingerprint(step.model, record.fingerprint, step.version)
            if model is None and self._registry.arriving(step.model, record.fingerprint):
                # Another replica loaded a newly published version before this one's poll did.
                raise Unavailable(
                    f"session {step.session_id!r} runs on a version of {step.model} (fingerprint "
                    f"{record.fingerprint.hex()[:12]}) this server is loading now; retry in a moment"
                )
            if model is None:
                raise FailedPrecondition(
                    f"session {step.session_id!r} was started on a model version (fingerprint "
                    f"{record.fingerprint.hex()[:12]}) this server has not loaded; start a new session"
                )
            known[found] = model
        if step.version not in (0, model.version):
            raise FailedPrecondition(
                f"session {step.session_id!r} is pinned to {model.name} version {model.version}, "
                f"the step asked for version {step.version}; send version 0 or {model.version}"
            )
        return model

    # -- compute ---------------------------------------------------------------------------------

    async def _compute(
        self, plans: dict[int, _Planned], items: list[Pending], answers: list[Answer | None]
    ) -> dict[int, tuple[SessionRecord, Tensors]]:
        """New records (and each step's outputs) for every plan, one runtime call per (model version, chunk length)."""
        groups: dict[tuple[bytes, int], list[int]] = {}
        for i, plan in plans.items():
            groups.setdefault((plan.model.fingerprint, plan.x.shape[0]), []).append(i)
        if not groups:
            return {}
        work = [(members, plans[members[0]].model) for members in groups.values()]
        if self._settings.runtime.inline(len(plans)):
            # A small batch costs less on the event loop than a hand-off to a runtime thread and back; so may a
            # large one, where other worker processes keep the CPUs busy meanwhile (`inline_min_rows`).
            outcomes = _run_groups(work, plans, items)
        else:
            outcomes = await asyncio.get_running_loop().run_in_executor(self._executor, _run_groups, work, plans, items)
        records: dict[int, tuple[SessionRecord, Tensors]] = {}
        for (members, model), outcome in zip(work, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                log.error("runtime call failed for %s/%d", model.name, model.version, exc_info=outcome)
                for i in members:
                    answers[i] = outcome
                    del plans[i]
                continue
            group_records, group_outputs, seconds = outcome
            series = self._metrics.model(model.name, model.version)
            series.runtime_latency.observe(seconds)
            series.batch_size.observe(len(members))
            records.update(zip(members, zip(group_records, group_outputs, strict=True), strict=True))
        return records

    # -- commit ----------------------------------------------------------------------------------

    async def _commit(
        self,
        items: list[Pending],
        plans: dict[int, _Planned],
        computed: dict[int, tuple[SessionRecord, Tensors]],
        answers: list[Answer | None],
    ) -> list[int]:
        """Commit every computed record; answer what landed; return the steps to judge again."""
        order = list(computed)
        if not order:
            return []
        sessions = self._settings.sessions
        commits = [
            Commit(
                items[i].key,
                plans[i].apply.expected,
                computed[i][0].token,
                computed[i][0].encoded(),
                sessions.ended_ttl_s if computed[i][0].ended else sessions.state_ttl_s,
            )
            for i in order
        ]
        limit = self._settings.auth.max_sessions_per_tenant
        if limit:  # each tenant's live sessions counted in the store, where starts are refused past the limit
            prefix = self._settings.redis.key_prefix
            for i, commit in zip(order, commits, strict=True):
                tenant = items[i].step.tenant
                if tenant:
                    commit.live = live_sessions_key(prefix, tenant)
                    apply = plans[i].apply
                    opens = apply.base is None and not apply.restarts  # a restart replaces one live session
                    commit.live_limit = -1 if computed[i][0].ended else limit if opens else 0
        started = time.perf_counter()
        try:
            outcomes = await self._store.commit_many(commits)
        except RnnServeError as err:  # the outcome is unknown: a resend of the step settles it
            for i in order:
                self._cache.forget(items[i].key)
                answers[i] = _unconfirmed(err.message)
            return []
        self._metrics.store_commit_latency.observe(time.perf_counter() - started)
        again = []
        for i, outcome in zip(order, outcomes, strict=True):
            item, (record, outputs), model = items[i], computed[i], plans[i].model
            if outcome.outcome is Outcome.OK:
                self._cache.remember(item.key, record)
                answers[i] = StepResult(model.name, model.version, item.step.session_id, record.seq, outputs)
            elif outcome.outcome is Outcome.ERROR:
                self._cache.forget(item.key)
                answers[i] = StoreRefused(f"the session store refused the commit ({outcome.current}); not applied")
            elif outcome.outcome is Outcome.LIMIT:
                self._cache.forget(item.key)
                answers[i] = Overloaded(
                    f"tenant {item.step.tenant!r} holds {outcome.current} live sessions, its limit; end or delete "
                    "one (or let one idle out) before starting another"
                )
            elif outcome.outcome is Outcome.UNKNOWN:
                self._cache.forget(item.key)
                answers[i] = _unconfirmed(outcome.current or "no reason given")
            else:  # another writer got there first, or the record is gone: judge the step again
                self._cache.forget(item.key)
                self._metrics.conflicts.inc()
                item.fresh = True
                again.append(i)
        return again


def _unconfirmed(why: str) -> Unavailable:
    return Unavailable(
        f"the session store did not confirm the commit ({why}); the step may or may not have been applied: "
        "send it again (a resend of an applied step is answered as a replay)"
    )


def check_input(model: LoadedModel, x: np.ndarray, max_steps: int) -> np.ndarray:
    """x as float32 [T, F] for `model`, or InvalidArgument."""
    features = model.manifest.features
    if x.ndim != 2 or x.shape[1] != features or not 1 <= x.shape[0] <= max_steps:
        raise InvalidArgument(
            f"input must be [T, {features}] with 1 <= T <= {max_steps} for {model.name}/{model.version}, "
            f"got {list(x.shape)}"
        )
    return x.astype(np.float32, copy=False)


# New records (each carrying its bytes), each step's outputs for its answer, the runtime call's seconds.
Computed = tuple[list[SessionRecord], list[Tensors], float]


def _run_groups(
    work: Sequence[tuple[list[int], LoadedModel]], plans: dict[int, _Planned], items: list[Pending]
) -> list[Computed | BaseException]:
    """Each group's runtime call, then each session's new record (on the event loop, or a runtime thread)."""
    out: list[Computed | BaseException] = []
    for members, model in work:
        try:
            out.append(_run_group(model, [plans[i] for i in members], [items[i] for i in members]))
        except Exception as err:  # noqa: BLE001 - reported per group, the others go on
            out.append(err)
    return out


def _run_group(model: LoadedModel, plans: list[_Planned], items: list[Pending]) -> Computed:
    started = time.perf_counter()
    # Every step of a group has one shape [T, F]: joined end to end, at a third of np.stack's cost (which
    # makes a view of each input first).
    x = np.concatenate([plan.x for plan in plans]).reshape(len(plans), *plans[0].x.shape)
    outputs, new_states = model.runtime.run(x, _batch_states(model, plans))
    seconds = time.perf_counter() - started
    count = len(plans)
    epochs, start_ids, seqs, digests, ends = [], [], [], [], []
    for plan, item in zip(plans, items, strict=True):
        base = plan.apply.base
        epochs.append(base.epoch if base else item.epoch)
        start_ids.append(base.start_id if base else item.ask.start_id)
        seqs.append(plan.apply.seq)
        digests.append(item.ask.digest)
        ends.append(item.step.end)
    blobs: list[bytes] = [b""] * count
    for ended in (False, True):  # a tombstone keeps no state: its rows are encoded apart
        rows = [i for i in range(count) if ends[i] == ended]
        if not rows:
            continue
        # Usually every row: then the arrays as they are (indexing by a list of rows copies them all).
        every = len(rows) == count
        encoded = encode_rows(
            model.fingerprint,
            [epochs[i] for i in rows],
            [start_ids[i] for i in rows],
            [seqs[i] for i in rows],
            [digests[i] for i in rows],
            {} if ended else {name: value if every else value[rows] for name, value in new_states.items()},
            {name: value if every else value[rows] for name, value in outputs.items()},
            ended=ended,
        )
        for i, blob in zip(rows, encoded, strict=True):
            blobs[i] = blob
    # A record keeps its own bytes, not a view of the batch's arrays (which it would keep alive); an answer,
    # gone once sent, may view them.
    fingerprint = model.fingerprint
    records = [
        SessionRecord(fingerprint, epochs[i], seqs[i], None, None, start_ids[i], digests[i], ends[i], blob=blobs[i])
        for i in range(count)
    ]
    return records, [{name: value[row] for name, value in outputs.items()} for row in range(count)], seconds


def _batch_states(model: LoadedModel, plans: list[_Planned]) -> Tensors:
    """The states the steps start from, [B, ...]: read from their records' bytes at once where every record
    has them (records this replica made or loaded do), else stacked record by record."""
    layout = model.record_layout
    blobs = [plan.apply.base.blob if plan.apply.base else layout.fresh for plan in plans]
    if None not in blobs:
        stacked = stack_states(layout, blobs)  # type: ignore[arg-type]
        if stacked is not None:
            return stacked
    return {
        name: np.stack([plan.apply.base.states[name] if plan.apply.base else fresh for plan in plans])
        for name, fresh in model.zero_states().items()
    }
