"""A bare gRPC server answering every streamed step with an empty response: the transport floor.

Both protocols: rnnserve.v1 Stream and StreamBatch, and KServe v2 ModelStreamInfer (echoing the request id).

python -m bench.echo --port N
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import AsyncIterable, AsyncIterator
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from service.api import kserve_messages as kv
from service.api.pb.rnnserve.v1 import rnnserve_pb2 as pb
from service.api.pb.rnnserve.v1 import rnnserve_pb2_grpc as pb_grpc


class Echo(pb_grpc.RnnServeServicer):
    async def Stream(  # noqa: N802
        self, request_iterator: AsyncIterable[pb.StepRequest], context: object
    ) -> AsyncIterator[pb.StepResponse]:
        async for request in request_iterator:
            yield pb.StepResponse(session_id=request.session_id, seq=request.seq, model=request.model)

    async def StreamBatch(  # noqa: N802
        self, request_iterator: AsyncIterable[pb.StepBatch], context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.StepBatchResult]:
        # Headers at once, as rnnserve sends them (naming no worker): a load generator asks before it sends.
        await context.send_initial_metadata(())
        async for batch in request_iterator:
            yield pb.StepBatchResult(
                id=batch.id,
                responses=[pb.StepResponse(session_id=s.session_id, seq=s.seq, model=s.model) for s in batch.steps],
            )


async def stream_infer(requests: AsyncIterable[Any], context: object) -> AsyncIterator[Any]:
    async for request in requests:
        yield kv.ModelStreamInferResponse(infer_response=kv.ModelInferResponse(id=request.id))


async def main(port: int) -> None:
    server = grpc.aio.server()
    # Only the streams are served; the other methods answer UNIMPLEMENTED.
    pb_grpc.add_RnnServeServicer_to_server(Echo(), server)  # type: ignore[abstract]
    kserve = grpc.stream_stream_rpc_method_handler(
        stream_infer,
        request_deserializer=kv.ModelInferRequest.FromString,
        response_serializer=kv.ModelStreamInferResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(kv.SERVICE, {"ModelStreamInfer": kserve}),))
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await health.set("", health_pb2.HealthCheckResponse.SERVING)
    await server.wait_for_termination()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    asyncio.run(main(parser.parse_args().port))
