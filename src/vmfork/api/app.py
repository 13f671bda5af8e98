"""The FastAPI application: one Manager shared by every request; blocking Manager calls run
in a worker thread (the per-instance locks serialise them, against the CLI too)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, TypeVar

import anyio
import anyio.to_thread
from fastapi import Depends, FastAPI, Request
from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Receive, Scope, Send

from vmfork import __version__
from vmfork.api import problems
from vmfork.api.auth import TokenCheck
from vmfork.api.metrics import Metrics
from vmfork.util import one_line

T = TypeVar("T")
# Worker threads for blocking Manager calls: long execs each hold one while they run.
THREADS = 256
# Execs the server runs at once on one instance (the guest agent runs at most 32 commands;
# a few are left for the CLI): more wait for a slot, in order.
EXEC_SLOTS = 24


class State:
    def __init__(self, data_dir: Path) -> None:
        from vmfork.instances import Manager

        self.data_dir = data_dir
        self.mgr = Manager(data_dir)
        from concurrent.futures import ThreadPoolExecutor

        # a warm pool's refill after a fork took a slot: in the background, one at a time
        self.refiller = ThreadPoolExecutor(1, thread_name_prefix="vmfork-pool-refill")

        def refill(job: Callable[[], None]) -> None:
            self.refiller.submit(job)

        self.mgr.refill = refill
        self.metrics = Metrics()
        self.started = time.monotonic()
        self.limiter = anyio.CapacityLimiter(THREADS)
        from vmfork.api.idle import AutoStandby

        self.auto = AutoStandby(data_dir)
        self._exec_slots: dict[str, asyncio.Semaphore] = {}
        self.pulls: dict[str, Any] = {}  # image pulls in progress or failed (api/images.py)

    @contextlib.asynccontextmanager
    async def exec_slot(self, ref: str) -> AsyncIterator[None]:
        """One of the instance's EXEC_SLOTS, for the duration of an exec."""
        iid = (await blocking(self, self.mgr.find, ref)).id
        sem = self._exec_slots.setdefault(iid, asyncio.Semaphore(EXEC_SLOTS))
        async with sem:
            yield


def state(request: Request) -> State:
    s: State = request.app.state.vmfork
    return s


async def blocking(st: State, fn: Callable[..., T], *args: Any, **kw: Any) -> T:
    """Run a blocking call in a worker thread (never on the event loop)."""
    return await anyio.to_thread.run_sync(functools.partial(fn, *args, **kw), limiter=st.limiter)


class AuthAndCount:
    """ASGI middleware: TCP requests need the bearer token (the unix socket does not: it is
    0600); every HTTP answer is counted for /metrics."""

    def __init__(self, app: ASGIApp, st: State) -> None:
        self.app, self.st = app, st
        self.tokens = TokenCheck(st.data_dir)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        server: Any = scope.get("server")
        over_tcp = bool(server) and server[1] is not None  # unix sockets have no port
        if over_tcp:
            headers = dict(scope.get("headers") or [])
            auth = headers.get(b"authorization", b"").decode("latin-1") or None
            if not self.tokens.ok(auth):
                if scope["type"] == "websocket":
                    await send({"type": "websocket.close", "code": 4401, "reason": "unauthorized"})
                    return
                detail = "missing bearer token" if auth is None else "wrong bearer token"
                resp = problems.problem(401, "unauthorized", f"{detail} (see <data-dir>/api-token)",
                                        scope.get("path"), {"WWW-Authenticate": "Bearer"})
                await resp(scope, receive, send)
                self.st.metrics.count_request(scope.get("method", "WS"), 401)
                return
        if scope["type"] == "websocket":
            await self.app(scope, receive, send)
            return

        async def counting_send(message: Any) -> None:
            if message["type"] == "http.response.start":
                self.st.metrics.count_request(scope["method"], int(message["status"]))
            await send(message)

        await self.app(scope, receive, counting_send)


async def strict_query(conn: HTTPConnection) -> None:
    """Unknown query parameters are refused (400 invalid), as unknown body fields are: a
    misspelt option is not silently ignored."""
    dependant = getattr(conn.scope.get("route"), "dependant", None)
    if dependant is None or not conn.query_params:
        return
    allowed: set[str] = set()
    todo = [dependant]
    while todo:
        d = todo.pop()
        allowed.update(p.alias for p in d.query_params)
        todo += d.dependencies
    unknown = [k for k in conn.query_params if k not in allowed]
    if unknown:
        raise problems.ApiError(400, "invalid", f"unknown query parameter {one_line(unknown[0])[:100]!r}"
                                + (f" (this operation takes: {', '.join(sorted(allowed))})" if allowed else ""))


def create_app(data_dir: Path) -> FastAPI:
    from vmfork.api import exec_routes, images, instances, service

    app = FastAPI(
        title="vmfork", version=__version__, dependencies=[Depends(strict_query)],
        description="vmfork's HTTP API: instances that boot, stand by, restore and fork copy-on-write. "
                    "Paths follow hypeman's OpenAPI 0.3.0; errors are RFC 9457 problem+json with a "
                    "stable `code`.",
    )
    st = State(data_dir)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        monitor = asyncio.ensure_future(st.auto.run(st))  # auto-standby of idle instances
        try:
            yield
        finally:
            monitor.cancel()
            st.refiller.shutdown(wait=True, cancel_futures=True)  # a refill under way ends whole

    app.router.lifespan_context = lifespan
    app.state.vmfork = st
    problems.install(app)
    app.include_router(service.router)
    app.include_router(instances.router)
    app.include_router(exec_routes.router)
    app.include_router(images.router)
    app.add_middleware(AuthAndCount, st=st)
    app.openapi = functools.partial(_openapi, app)  # type: ignore[method-assign]
    return app


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's document, without its 422 answers: invalid input is a 400 problem here."""
    from fastapi.openapi.utils import get_openapi

    if app.openapi_schema is None:
        doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        for ops in doc.get("paths", {}).values():
            for op in ops.values():
                op.get("responses", {}).pop("422", None)
        for name in ("HTTPValidationError", "ValidationError"):
            doc.get("components", {}).get("schemas", {}).pop(name, None)
        app.openapi_schema = doc
    return app.openapi_schema
