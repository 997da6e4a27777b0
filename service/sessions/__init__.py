"""The session engine: the contract (rules), the batch path, the replica's cache, the public operations."""

from service.sessions.engine import SessionEngine
from service.sessions.steps import Answer, SessionInfo, Step, StepResult

__all__ = ["Answer", "SessionEngine", "SessionInfo", "Step", "StepResult"]
