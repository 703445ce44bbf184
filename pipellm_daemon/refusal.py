"""A request the daemon refuses, with the gRPC status that says why; the same codes travel on the data plane."""

from __future__ import annotations

import grpc
from pipellm_client.errors import ChannelDead, InvalidArgument, StaleSource, TagMismatch
from pipellm_client.keys import KeyAgreementError

from .errors import CommitAborted, PoolExhausted, ProtocolViolation


class Refusal(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    @property
    def number(self) -> int:
        return int(self.code.value[0])


def invalid(message: str) -> Refusal:
    return Refusal(grpc.StatusCode.INVALID_ARGUMENT, message)


def not_found(message: str) -> Refusal:
    return Refusal(grpc.StatusCode.NOT_FOUND, message)


def exhausted(message: str) -> Refusal:
    return Refusal(grpc.StatusCode.RESOURCE_EXHAUSTED, message)


def precondition(message: str) -> Refusal:
    return Refusal(grpc.StatusCode.FAILED_PRECONDITION, message)


def unavailable(message: str) -> Refusal:
    return Refusal(grpc.StatusCode.UNAVAILABLE, message)


def from_exception(exc: BaseException) -> Refusal:
    """Map the typed errors of the channel model and the pipeline to status codes."""
    if isinstance(exc, Refusal):
        return exc
    if isinstance(exc, TagMismatch):
        return Refusal(grpc.StatusCode.DATA_LOSS, str(exc))
    if isinstance(exc, ChannelDead | StaleSource):
        return precondition(str(exc))
    if isinstance(exc, PoolExhausted):
        return exhausted(str(exc))
    if isinstance(exc, CommitAborted):
        return Refusal(grpc.StatusCode.ABORTED, str(exc))
    if isinstance(exc, InvalidArgument | KeyAgreementError | ProtocolViolation):
        return invalid(str(exc))
    return Refusal(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}")
