"""Service errors raised by the domain code and turned into gRPC statuses in one place.

Handlers never build statuses by hand: they raise one of these, and `abort` maps it, attaching a
`google.rpc.BadRequest` with one field violation per bad field for INVALID_ARGUMENT.
"""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status


class ServiceError(Exception):
    """Base of the errors a client can act on; `code` is the gRPC status it becomes, declared with each
    subclass: `class NotFound(ServiceError, code=grpc.StatusCode.NOT_FOUND)`."""

    code = grpc.StatusCode.INTERNAL

    def __init_subclass__(cls, code: grpc.StatusCode | None = None, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if code is not None:
            cls.code = code


class InvalidArgument(ServiceError, code=grpc.StatusCode.INVALID_ARGUMENT):
    """Bad input; `violations` are (field path, description) pairs, e.g. ("loads.data", "NaN at [0, 3]")."""

    def __init__(self, violations: list[tuple[str, str]]) -> None:
        self.violations = violations
        super().__init__("; ".join(f"{field}: {description}" for field, description in violations))


class NotFound(ServiceError, code=grpc.StatusCode.NOT_FOUND):
    """The deployment named is not registered (or was deleted meanwhile), or has no placement yet."""


class FailedPrecondition(ServiceError, code=grpc.StatusCode.FAILED_PRECONDITION):
    """A well-formed request the deployment's state refuses: a stale base_version, no telemetry yet."""


class ResourceExhausted(ServiceError, code=grpc.StatusCode.RESOURCE_EXHAUSTED):
    """A queue, memory budget or per-job limit is full; the message names what to lower or when to retry."""


class DeadlineExceeded(ServiceError, code=grpc.StatusCode.DEADLINE_EXCEEDED):
    """The caller's deadline passed before or during the solve; the job was dropped unsolved."""


class Unavailable(ServiceError, code=grpc.StatusCode.UNAVAILABLE):
    """The server is shutting down, or its state store cannot take a write now: retry (elsewhere)."""


class Internal(ServiceError, code=grpc.StatusCode.INTERNAL):
    """A fault of the server itself; the message never carries the fault's own text (that is logged)."""

    def __init__(self, message: str = "internal error; the server log has the details") -> None:
        super().__init__(message)


def out_of_memory(error: BaseException) -> bool:
    """Whether `error` is an allocation failure (MemoryError, or torch's allocator RuntimeError)."""
    if isinstance(error, MemoryError):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and ("out of memory" in text or "can't allocate" in text)


def to_status(error: ServiceError) -> grpc.Status:
    """The rich status for `error` (code, message, and BadRequest details for INVALID_ARGUMENT)."""
    status = status_pb2.Status(code=getattr(code_pb2, error.code.name), message=str(error))
    if isinstance(error, InvalidArgument):
        bad_request = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=field, description=description)
                for field, description in error.violations
            ]
        )
        detail = any_pb2.Any()
        detail.Pack(bad_request)
        status.details.append(detail)
    return rpc_status.to_status(status)


async def abort(context: grpc.aio.ServicerContext, error: ServiceError) -> None:
    """End the RPC with `error`'s status (raises grpc.aio.AbortError, as context.abort does)."""
    status = to_status(error)
    await context.abort(status.code, status.details, status.trailing_metadata)
