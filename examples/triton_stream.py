"""An unchanged Triton client (tritonclient[grpc]) streaming a sequence to rnnserve, numbered for
exactly-once resends.

    python examples/triton_stream.py --target localhost:8500

Each request names its step with the parameter `rnnserve_seq`, and the start with `rnnserve_start_id`:
a request sent again after a lost answer returns its first answer instead of being applied twice.
"""

from __future__ import annotations

import argparse
import queue
import secrets

import numpy as np
import tritonclient.grpc as grpcclient


def main(target: str, model: str, steps: int) -> None:
    client = grpcclient.InferenceServerClient(target)
    features = client.get_model_metadata(model).inputs[0].shape[2]
    answers: queue.Queue[tuple[object, object]] = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    start_id = secrets.randbits(62) | 1
    rng = np.random.default_rng(0)
    for seq in range(1, steps + 1):
        x = grpcclient.InferInput("x", [1, 1, features], "FP32")  # [batch 1, T steps, F features]
        x.set_data_from_numpy(np.eye(features, dtype=np.float32)[[rng.integers(features)]][None])
        parameters = {"rnnserve_seq": seq} | ({"rnnserve_start_id": start_id} if seq == 1 else {})
        client.async_stream_infer(
            model,
            [x],
            sequence_id="triton-example",
            sequence_start=seq == 1,
            sequence_end=seq == steps,
            parameters=parameters,
        )
    for _ in range(steps):
        result, error = answers.get(timeout=30)
        if error is not None:
            raise SystemExit(f"refused: {error}")
        applied = result.get_response().parameters["rnnserve_seq"].int64_param
        print(f"step {applied}: output {result.as_numpy('logits').shape}")
    client.stop_stream()
    client.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="localhost:8500")
    parser.add_argument("--model", default="charlm-lstm")
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    main(args.target, args.model, args.steps)
