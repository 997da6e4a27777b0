"""A gateway forwarding many sensors' readings to a forecaster, all sessions on one stream.

    python examples/gateway.py --target localhost:8500 --sensors 200 --readings 20

Each sensor is a session of glucose-lstm; raw readings go in as they come ([glucose mg/dL, minutes since
the previous reading], as the model's manifest says), and each answer carries the forecast of the next
reading and an anomaly score. Sessions step
concurrently; each session's steps are applied in order.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import numpy as np

from service.api.pb.rnnserve.v1 import rnnserve_pb2 as pb
from service.client import StreamClient


async def main(target: str, model: str, sensors: int, readings: int) -> None:
    async with StreamClient(target) as client:
        listing = await client.stub.ListModels(pb.ListModelsRequest())
        info = max((m for m in listing.models if m.name == model), key=lambda m: m.version)
        print(json.loads(info.manifest_json)["preprocessing"]["notes"])
        rng = np.random.default_rng(1)
        forecasts: dict[int, float] = {}

        async def sensor(i: int) -> None:
            session = client.session(model, f"sensor-{i}")
            level = 100.0 + 20 * rng.standard_normal()
            for t in range(readings):
                level += rng.normal(0, 2)
                x = np.array([[level, 5.0 if t else 0.0]], np.float32)  # a reading every 5 minutes
                reply = await session.step(x, end=t == readings - 1)
                forecasts[i] = float(reply.outputs["forecast"][-1, 0])

        started = time.perf_counter()
        await asyncio.gather(*(sensor(i) for i in range(sensors)))
        seconds = time.perf_counter() - started
    steps = sensors * readings
    print(f"{sensors} sensors x {readings} readings = {steps} steps in {seconds:.2f}s ({steps / seconds:.0f} steps/s)")
    print(f"forecasts received for {len(forecasts)} sensors, e.g. sensor-0: next {forecasts[0]:.1f} mg/dL")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="localhost:8500")
    parser.add_argument("--model", default="glucose-lstm")
    parser.add_argument("--sensors", type=int, default=200)
    parser.add_argument("--readings", type=int, default=20)
    args = parser.parse_args()
    asyncio.run(main(args.target, args.model, args.sensors, args.readings))
