"""A gateway forwarding thousands of sensors' readings to a forecaster, many sensors per message.

    python examples/fan_in_gateway.py --target localhost:8500 --sensors 2000 --readings 10

Each sensor is a session of glucose-lstm. The sensors are split into groups; each group's readings go out
as one `StreamBatch` message per round (`BatchClient.step`), and the groups step concurrently, which keeps
every stream (and every worker of the server) busy. `BatchClient` numbers, starts and ends the sessions,
resends after a reconnect (a step already applied is answered as a replay), and cuts a group larger than a
message allows into several messages.
"""

from __future__ import annotations

import argparse
import asyncio
import time

import numpy as np

from service.client import BatchClient, StepError


async def main(target: str, model: str, sensors: int, readings: int, group: int) -> None:
    names = [f"sensor-{i}" for i in range(sensors)]
    groups = [names[i : i + group] for i in range(0, sensors, group)]
    rng = np.random.default_rng(1)
    levels = dict(zip(names, 100.0 + 20 * rng.standard_normal(sensors), strict=True))
    forecasts: dict[str, float] = {}
    refused = 0

    async with BatchClient(target) as gateway:

        async def forward(members: list[str]) -> None:
            nonlocal refused
            for t in range(readings):
                inputs = {}
                for name in members:  # [glucose mg/dL, minutes since the previous reading], as the manifest says
                    levels[name] += rng.normal(0, 2)
                    inputs[name] = np.array([[levels[name], 5.0 if t else 0.0]], np.float32)
                ending = members if t == readings - 1 else ()
                replies = await gateway.step(model, inputs, end=ending)
                for name, reply in replies.items():
                    if isinstance(reply, StepError):  # refused: the session stays where it was
                        refused += 1
                        print(f"{name}: {reply}")
                    else:
                        forecasts[name] = float(reply.outputs["forecast"][-1, 0])

        started = time.perf_counter()
        await asyncio.gather(*(forward(members) for members in groups))
        seconds = time.perf_counter() - started
        workers = len(set(gateway.workers))
    steps = sensors * readings
    print(
        f"{sensors} sensors x {readings} readings = {steps} steps in {seconds:.2f}s ({steps / seconds:.0f} steps/s), "
        f"{len(groups)} groups of up to {group} sensors a message, on {workers} server process(es)"
    )
    print(f"forecasts received for {len(forecasts)} sensors, {refused} steps refused")
    print(f"e.g. sensor-0: next reading {forecasts['sensor-0']:.1f} mg/dL")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="localhost:8500")
    parser.add_argument("--model", default="glucose-lstm")
    parser.add_argument("--sensors", type=int, default=2000)
    parser.add_argument("--readings", type=int, default=10)
    parser.add_argument("--group", type=int, default=256, help="sensors per message")
    args = parser.parse_args()
    asyncio.run(main(args.target, args.model, args.sensors, args.readings, args.group))
