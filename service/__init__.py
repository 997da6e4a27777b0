"""rnnserve's online service: gRPC streaming inference with session state in a store. Needs no torch."""

__version__ = "0.1.0"
