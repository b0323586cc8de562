"""Server interceptors: standard gRPC metrics, bearer-token authentication, and safe decoding.

py-grpc-prometheus only ships a sync `grpc.ServerInterceptor` (its asyncio support, issue #13 and PR #32
upstream, was never merged), so this small aio interceptor produces the same families and label sets:
grpc_server_started_total, grpc_server_handled_total{grpc_code}, grpc_server_handling_seconds,
grpc_server_msg_received_total and grpc_server_msg_sent_total, labelled grpc_type/grpc_service/grpc_method.
The metrics interceptor is listed first (outermost), so calls the token check refuses are counted too, as
grpc_code="UNAUTHENTICATED". The decoding interceptor is innermost: a message that does not parse
reaches the handler chain as an `Undecodable` value instead of failing inside gRPC (which would answer
UNKNOWN before the token is checked), and becomes INVALID_ARGUMENT once the call is authenticated, or
an in-band rejection in the streams that reject reports one by one.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import inspect
import time
from abc import abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass

import grpc

from .metrics import Metrics

_TYPES = {
    (False, False): "unary",
    (False, True): "server_stream",
    (True, False): "client_stream",
    (True, True): "bidi_stream",
}
_FACTORIES = {
    "unary": grpc.unary_unary_rpc_method_handler,
    "server_stream": grpc.unary_stream_rpc_method_handler,
    "client_stream": grpc.stream_unary_rpc_method_handler,
    "bidi_stream": grpc.stream_stream_rpc_method_handler,
}
_BEHAVIORS = {
    "unary": "unary_unary",
    "server_stream": "unary_stream",
    "client_stream": "stream_unary",
    "bidi_stream": "stream_stream",
}


def _rpc_type(handler: grpc.RpcMethodHandler) -> str:
    return _TYPES[(handler.request_streaming, handler.response_streaming)]


def _behavior(handler: grpc.RpcMethodHandler) -> Callable:
    """The handler's own coroutine or async generator (the one of its four slots its RPC type uses)."""
    return getattr(handler, _BEHAVIORS[_rpc_type(handler)])


def _rebuilt(handler: grpc.RpcMethodHandler, behavior: Callable, request_deserializer=None) -> grpc.RpcMethodHandler:
    """A handler of the same RPC type and serializer running `behavior` (and `request_deserializer`, when
    given, instead of the handler's own)."""
    return _FACTORIES[_rpc_type(handler)](
        behavior,
        request_deserializer=request_deserializer or handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


class _HandlerInterceptor(grpc.aio.ServerInterceptor):
    """An interceptor that replaces each method's handler: `replace` says with what (unknown methods,
    whose handler is None, pass through)."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        return None if handler is None else self.replace(handler, details)

    @abstractmethod
    def replace(self, handler: grpc.RpcMethodHandler, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        """The handler to run instead of `handler` for the method `details` names."""


class MetricsInterceptor(_HandlerInterceptor):
    """Counts and times every RPC by method and final status code."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def replace(self, handler: grpc.RpcMethodHandler, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        service, _, method = details.method.lstrip("/").rpartition("/")
        labels = (_rpc_type(handler), service, method)
        wrapped = self._wrap(_behavior(handler), labels, handler.request_streaming, handler.response_streaming)
        return _rebuilt(handler, wrapped)

    def _wrap(self, behavior, labels: tuple[str, str, str], request_streaming: bool, response_streaming: bool):
        m = self.metrics

        def count_requests(request_or_iterator):
            if not request_streaming:
                m.grpc_msg_received.labels(*labels).inc()
                return request_or_iterator

            async def counted() -> AsyncIterator:
                async for message in request_or_iterator:
                    m.grpc_msg_received.labels(*labels).inc()
                    yield message

            return counted()

        @contextlib.contextmanager
        def handled(context: grpc.aio.ServicerContext) -> Iterator[None]:
            """Counts the RPC started, then handled with its final code and timed, however it ends."""
            m.grpc_started.labels(*labels).inc()
            started, error = time.perf_counter(), None
            try:
                yield
            except BaseException as exc:
                error = exc
                raise
            finally:
                if error is None:
                    code = context.code() or grpc.StatusCode.OK
                elif isinstance(error, asyncio.CancelledError):
                    code = grpc.StatusCode.CANCELLED
                else:  # AbortError carries the code the handler set; anything else is UNKNOWN
                    code = context.code() or grpc.StatusCode.UNKNOWN
                if isinstance(code, int):
                    code = next(c for c in grpc.StatusCode if c.value[0] == code)
                m.grpc_handled.labels(*labels, code.name).inc()
                m.grpc_handling_seconds.labels(*labels).observe(time.perf_counter() - started)

        if response_streaming and inspect.isasyncgenfunction(behavior):

            async def streaming(request_or_iterator, context):
                with handled(context):
                    async for response in behavior(count_requests(request_or_iterator), context):
                        m.grpc_msg_sent.labels(*labels).inc()
                        yield response

            return streaming

        async def unary(request_or_iterator, context):
            with handled(context):
                response = await behavior(count_requests(request_or_iterator), context)
                if not response_streaming:
                    m.grpc_msg_sent.labels(*labels).inc()
                return response

        return unary


# Health stays open: kubelet gRPC probes and the image's HEALTHCHECK cannot send a token, and the answer
# (SERVING or not) reveals nothing. Everything else, reflection included, needs the token.
OPEN_METHODS = frozenset({"/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch"})


async def _unauthenticated(request_or_iterator, context: grpc.aio.ServicerContext) -> None:
    # The message never echoes what the caller sent: a near-miss token must not end up in client logs.
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token")


class TokenAuthInterceptor(_HandlerInterceptor):
    """Refuses every RPC outside OPEN_METHODS (UNAUTHENTICATED) unless its metadata carries
    `authorization: Bearer <token>`.

    Both sides are hashed before `hmac.compare_digest`, so the comparison takes the same time whatever
    the presented value, its length included. The token is kept only as that digest.
    """

    def __init__(self, token: str) -> None:
        self._expected = hashlib.sha256(f"Bearer {token}".encode()).digest()

    def authorized(self, metadata) -> bool:
        presented = next((value for key, value in metadata or () if key == "authorization"), "")
        if isinstance(presented, str):
            presented = presented.encode()
        return hmac.compare_digest(hashlib.sha256(presented).digest(), self._expected)

    def replace(self, handler: grpc.RpcMethodHandler, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        if details.method in OPEN_METHODS or self.authorized(details.invocation_metadata):
            return handler
        return _rebuilt(handler, _unauthenticated)


@dataclass(frozen=True)
class Undecodable:
    """Stands in for a request message that failed to parse; `reason` is the parser's short complaint."""

    reason: str


# Client-streaming methods whose handlers reject bad messages in-band, one by one.
IN_BAND_METHODS = frozenset({"/rebalancer.v1.RebalancerService/StreamLoad"})


def _safe(deserializer):
    if deserializer is None:
        return None

    def parse(data: bytes):
        try:
            return deserializer(data)
        except Exception as error:  # DecodeError and whatever else a parser raises on hostile bytes
            return Undecodable(type(error).__name__ if not str(error) else str(error)[:200])

    return parse


async def _refuse(context: grpc.aio.ServicerContext, message: Undecodable) -> None:
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"undecodable request message: {message.reason}")


class DecodeInterceptor(_HandlerInterceptor):
    """Parse request messages without letting a parse error escape into gRPC (see the module doc)."""

    def replace(self, handler: grpc.RpcMethodHandler, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        behavior = _behavior(handler)
        if handler.request_streaming:
            wrapped = behavior if details.method in IN_BAND_METHODS else self._checked_stream(behavior)
        else:
            wrapped = self._checked_unary(behavior, handler.response_streaming)
        return _rebuilt(handler, wrapped, _safe(handler.request_deserializer))

    @staticmethod
    def _checked_unary(behavior, response_streaming: bool):
        if response_streaming and inspect.isasyncgenfunction(behavior):

            async def streaming(request, context):
                if isinstance(request, Undecodable):
                    await _refuse(context, request)
                async for response in behavior(request, context):
                    yield response

            return streaming

        async def unary(request, context):
            if isinstance(request, Undecodable):
                await _refuse(context, request)
            return await behavior(request, context)

        return unary

    @staticmethod
    def _checked_stream(behavior):
        async def messages(request_iterator, context) -> AsyncIterator:
            async for message in request_iterator:
                if isinstance(message, Undecodable):
                    await _refuse(context, message)
                yield message

        if inspect.isasyncgenfunction(behavior):

            async def streaming(request_iterator, context):
                async for response in behavior(messages(request_iterator, context), context):
                    yield response

            return streaming

        async def unary(request_iterator, context):
            return await behavior(messages(request_iterator, context), context)

        return unary
