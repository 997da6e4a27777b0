"""Stream text to a character model over the native API, one character per step, and print its guesses.

    python examples/native_client.py --target localhost:8500 --text "To be, or not to be"

The client resends unanswered steps after a lost connection; the server answers a step it had already
applied as a replay, so every character is applied exactly once.
"""

from __future__ import annotations

import argparse
import asyncio
import json

import numpy as np

from service.api.pb.rnnserve.v1 import rnnserve_pb2 as pb
from service.client import StreamClient


async def main(target: str, model: str, text: str) -> None:
    async with StreamClient(target) as client:
        listing = await client.stub.ListModels(pb.ListModelsRequest())
        info = max((m for m in listing.models if m.name == model), key=lambda m: m.version)
        vocabulary: str = json.loads(info.manifest_json)["preprocessing"]["vocabulary"]
        one_hot = np.eye(len(vocabulary), dtype=np.float32)
        session = client.session(model)
        for char in text:
            reply = await session.step(one_hot[vocabulary.index(char)][None])  # x: [T=1, F]
            guess = vocabulary[int(reply.outputs["logits"][-1].argmax())]
            print(f"seq {reply.seq:3d}  {char!r} -> next {guess!r}")
        await session.step(one_hot[vocabulary.index(".")][None], end=True)
        print(f"session {session.session_id} on {model}/{reply.version} ended at seq {session.acked_seq}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="localhost:8500")
    parser.add_argument("--model", default="charlm-lstm")
    parser.add_argument("--text", default="To be, or not to be")
    args = parser.parse_args()
    asyncio.run(main(args.target, args.model, args.text))
