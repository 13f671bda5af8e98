"""RFC 9457 problem+json errors with stable codes, mapped from vmfork's exception classes."""

from __future__ import annotations

from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from vmfork import errors
from vmfork.util import one_line

PROBLEM_JSON = "application/problem+json"

# exception class -> (HTTP status, stable code); the first match in this order wins.
CODES: list[tuple[type[BaseException], int, str]] = [
    (errors.InvalidArgument, 400, "invalid"),
    (errors.NotFound, 404, "not_found"),
    (errors.AlreadyExists, 409, "already_exists"),
    (errors.WrongState, 409, "wrong_state"),
    (errors.Busy, 409, "busy"),
    (errors.ExecAborted, 409, "exec_aborted"),
    (errors.NoSpace, 507, "no_space"),
    (errors.AgentError, 502, "agent_error"),
    (errors.RegistryError, 502, "registry_error"),
    (errors.HypervisorError, 500, "hypervisor_error"),
    (errors.ExternalToolError, 500, "external_tool_error"),
    (errors.ImageError, 500, "image_error"),
    (errors.VmforkError, 500, "internal"),
]
TITLES = {
    "invalid": "Invalid request", "not_found": "Not found", "already_exists": "Already exists",
    "wrong_state": "Wrong state", "busy": "Busy", "exec_aborted": "Exec aborted",
    "no_space": "No space", "agent_error": "Guest agent error", "registry_error": "Registry error",
    "hypervisor_error": "Hypervisor error",
    "external_tool_error": "External tool failed", "image_error": "Image error", "internal": "Internal error",
    "unauthorized": "Unauthorized", "too_large": "Payload too large", "unsupported": "Not supported",
    "method_not_allowed": "Method not allowed", "timeout": "Timed out",
}


class ApiError(Exception):
    """An error the API itself raises (not one of the manager's)."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.code, self.detail = status, code, detail


def classify(exc: BaseException) -> tuple[int, str]:
    for cls, status, code in CODES:
        if isinstance(exc, cls):
            return status, code
    return 500, "internal"


def problem(status: int, code: str, detail: str, instance: str | None = None,
            headers: dict[str, str] | None = None) -> JSONResponse:
    body: dict[str, Any] = {"type": "about:blank", "title": TITLES.get(code, code), "status": status,
                            "detail": one_line(detail)[:2000], "code": code}
    if instance is not None:
        body["instance"] = instance
    return JSONResponse(body, status_code=status, media_type=PROBLEM_JSON, headers=headers)


async def on_vmfork_error(request: Request, exc: Exception) -> JSONResponse:
    status, code = classify(exc)
    return problem(status, code, str(exc), request.url.path)


async def on_api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
    return problem(exc.status, exc.code, exc.detail, request.url.path, headers)


async def on_validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    parts = []
    for e in exc.errors()[:5]:
        loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body") or "body"
        parts.append(f"{loc}: {e.get('msg', 'invalid')}")
    return problem(400, "invalid", "; ".join(parts) or "invalid request", request.url.path)


async def on_http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = {404: "not_found", 405: "method_not_allowed", 401: "unauthorized"}.get(exc.status_code, "invalid")
    return problem(exc.status_code, code, str(exc.detail), request.url.path)


async def on_os_error(request: Request, exc: Exception) -> JSONResponse:
    import errno

    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return problem(507, "no_space", f"no space left on device: {exc.filename or ''}", request.url.path)
    return problem(500, "internal", f"{type(exc).__name__}: {exc}", request.url.path)


def install(app: Any) -> None:
    app.add_exception_handler(errors.VmforkError, on_vmfork_error)
    app.add_exception_handler(ApiError, on_api_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(OSError, on_os_error)


def responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for the problem statuses a route can answer."""
    from vmfork.models import Problem

    return {s: {"model": Problem, "description": "A problem (RFC 9457)",
                "content": {PROBLEM_JSON: {"schema": {"$ref": "#/components/schemas/Problem"}}}}
            for s in sorted({400, 401, 500, *statuses})}
