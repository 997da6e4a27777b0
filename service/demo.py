"""`rnnserve demo`: stream held-out Shakespeare to the served character model, one character per step.

Without --target it starts a server in this process on embedded defaults (in-memory state; no RNNSERVE_*
variable changes what it runs), streams through real gRPC, and stops the server. The text is the
held-out sample published beside the model (`<repo>/<model>/heldout_sample.txt`), never made up.
"""

from __future__ import annotations

import json
import logging
import statistics
import sys
import time
from pathlib import Path

import grpc
import numpy as np

from service.api.pb.rnnserve.v1 import rnnserve_pb2 as pb
from service.client import ClientTls, StepError, StreamClient
from service.repository import RepositoryError
from service.server import create_server
from service.settings import CodeSettings

SAMPLE_FILE = "heldout_sample.txt"
DEFAULT_MODEL = "charlm-lstm"


class DemoError(Exception):
    """Why the demo cannot run, and what to do about it."""


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted: np.ndarray = np.exp(logits - logits.max())
    return shifted / float(shifted.sum())


def _show(char: str) -> str:
    return {"\n": "\\n", " ": "␠"}.get(char, char)


async def run_demo(
    model_repo: Path,
    target: str | None,
    steps: int,
    generate: int,
    model: str = DEFAULT_MODEL,
    tls: ClientTls | None = None,
    token: str | None = None,
) -> int:
    app = None
    if target is None:
        logging.getLogger("service").setLevel(logging.ERROR)
        settings = CodeSettings(model_repo=model_repo, host="127.0.0.1", port=0, metrics_port=None)
        app = await create_server(settings)
        target = f"127.0.0.1:{app.port}"
        print(f"started rnnserve on {target}: embedded defaults, in-memory state, models from {model_repo}")
    try:
        async with StreamClient(target, reconnect_timeout_s=5, tls=tls, token=token) as client:
            return await _stream(client, model_repo, steps, generate, model)
    except grpc.aio.AioRpcError as err:
        if err.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
            raise DemoError(
                f"rnnserve at {target} refused the call ({_reason(err)}); pass a token of your tenant with --token "
                "(or RNNSERVE_TOKEN)"
            ) from err
        raise DemoError(f"no rnnserve answers at {target} ({_reason(err)}); start one with `rnnserve serve`") from err
    except ConnectionError as err:
        raise DemoError(f"no rnnserve answers at {target} ({_reason(err)}); start one with `rnnserve serve`") from err
    except StepError as err:  # a server that answers but refuses (its store unavailable, a session limit)
        if err.code is grpc.StatusCode.UNAVAILABLE:
            raise DemoError(f"rnnserve at {target} refused a step ({err}); retry once it is ready") from err
        raise DemoError(f"rnnserve at {target} refused a step ({err})") from err
    finally:
        if app is not None:
            await app.stop(grace_s=1.0)


def _reason(err: BaseException) -> str:
    if isinstance(err, grpc.aio.AioRpcError):
        return f"{err.code().name}: {err.details()}"
    return str(err)


async def _stream(client: StreamClient, model_repo: Path, steps: int, generate: int, model: str) -> int:
    listing = await client.stub.ListModels(pb.ListModelsRequest())
    language = sorted({m.name for m in listing.models if m.task == "language_model" and m.streamable})
    named = [m for m in listing.models if m.name == model]
    if not named:
        raise DemoError(f"the server has no model {model!r}; the demo streams text to one of: {', '.join(language)}")
    if model not in language:
        raise DemoError(
            f"{model} is a {named[0].task} model; the demo streams text to a character language model: "
            f"{', '.join(language) or 'none is loaded'}"
        )
    info = max(named, key=lambda m: m.version)  # the newest version: int8 where it passed its gate
    vocabulary: str = json.loads(info.manifest_json)["preprocessing"]["vocabulary"]
    index = {c: i for i, c in enumerate(vocabulary)}
    eye = np.eye(len(vocabulary), dtype=np.float32)
    sample = model_repo / info.name / SAMPLE_FILE
    if not sample.is_file():
        raise DemoError(
            f"no held-out text for {info.name} at {sample}: run the demo from the repository, or point "
            "--model-repo at the model repository that holds it"
        )
    text = sample.read_text()[: steps + 1]
    print(f"model {info.name}/{info.version} ({info.cell}, {info.precision}, fingerprint {info.fingerprint[:12]})")
    print(f"streaming {len(text) - 1} characters of held-out text, one step each\n")
    print(" seq  input  next  predicted (p)              latency")
    session = client.session(info.name)
    latencies, hits, nll = [], 0, 0.0
    probs = np.zeros(len(vocabulary))
    for seq, (char, following) in enumerate(zip(text, text[1:], strict=False), start=1):
        reply = await session.step(eye[index.get(char, index[" "])][None])
        latencies.append(reply.latency_s)
        probs = _softmax(reply.outputs["logits"][-1])
        top = np.argsort(probs)[::-1][:3]
        hits += vocabulary[top[0]] == following
        nll -= float(np.log(max(probs[index.get(following, index[" "])], 1e-12)))
        guesses = "  ".join(f"{_show(vocabulary[i])} {probs[i]:.2f}" for i in top)
        ms = reply.latency_s * 1e3
        print(f"{seq:4d}  {_show(char):>5}  {_show(following):>4}  {guesses:<25} {ms:6.2f} ms")

    rng = np.random.default_rng(7)
    generated = []
    for _ in range(generate):  # the model continues the text from its own predictions
        char = vocabulary[rng.choice(len(vocabulary), p=probs**2 / (probs**2).sum())]
        generated.append(char)
        reply = await session.step(eye[index[char]][None], end=len(generated) == generate)
        latencies.append(reply.latency_s)
        probs = _softmax(reply.outputs["logits"][-1])

    n = len(text) - 1
    ordered = sorted(x * 1e3 for x in latencies)
    print(f"\ncontinuation the model wrote (sampled at temperature 0.5):\n{text[-40:]}|{''.join(generated)}\n")
    print(f"next-character accuracy {hits / n:.1%}, perplexity {np.exp(nll / n):.2f} over {n} held-out steps")
    print(
        f"per-step round trip over gRPC: p50 {statistics.median(ordered):.2f} ms, "
        f"p90 {ordered[int(0.9 * len(ordered))]:.2f} ms, p99 {ordered[int(0.99 * len(ordered))]:.2f} ms "
        f"({len(ordered)} steps)"
    )
    print(f"session {session.session_id} ended at seq {session.acked_seq}")
    return 0


def main_sync(
    model_repo: Path,
    target: str | None,
    steps: int,
    generate: int,
    model: str,
    tls: ClientTls | None = None,
    token: str | None = None,
) -> int:
    import asyncio

    started = time.perf_counter()
    try:
        code = asyncio.run(run_demo(model_repo, target, steps, generate, model, tls, token))
    except DemoError as err:
        print(f"rnnserve demo: {err}", file=sys.stderr)
        return 2
    except RepositoryError as err:
        print(
            f"rnnserve demo: {err}; run it from the repository's checkout (make demo) or pass --model-repo "
            "with the path of a model repository",
            file=sys.stderr,
        )
        return 2
    print(f"demo finished in {time.perf_counter() - started:.1f}s")
    return code
