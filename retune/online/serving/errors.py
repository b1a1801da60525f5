"""The server's errors in OpenAI's shape, {"error": {"message", "type", "param", "code"}}:
`ApiError` (a client's mistake, raised anywhere), `error_response`, and the exception handlers
that answer every other failure (an invalid or unparsable body, a fault of the server) alike."""

from __future__ import annotations

import sys
from collections.abc import Mapping

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException


class ApiError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.param, self.code, self.headers)


_ERROR_TYPES = {
    401: "authentication_error",
    404: "not_found_error",
    413: "invalid_request_error",
    503: "service_unavailable",
}


def error_response(
    status: int,
    message: str,
    param: str | None = None,
    code: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    kind = _ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    message, param = _encodable(message), None if param is None else _encodable(param)
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def _encodable(text: str) -> str:
    """`text` with any lone surrogate (from a client's input) written as `\\udXXX`, so the
    answer can be encoded as UTF-8."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _parse_failure(cause: BaseException | None) -> str:
    """What FastAPI's "There was an error parsing the body" was, in words a client can act on."""
    if isinstance(cause, UnicodeDecodeError):
        return f"the body is not UTF-8 text ({cause.reason} at byte {cause.start})"
    if isinstance(cause, RecursionError):
        return "the body's JSON nests too deeply to parse"
    if isinstance(cause, ValueError) and "integer string conversion" in str(cause):
        return f"a number in the body has more than {sys.get_int_max_str_digits()} digits"
    if cause is not None:
        return f"the body is not valid JSON ({cause})"
    return "the body could not be parsed"


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    parts, first = [], None
    for err in exc.errors():
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        where = ".".join(loc) or "body"
        first = first or where
        if err.get("type") == "json_invalid":
            parts.append(f"the body is not valid JSON ({err.get('ctx', {}).get('error', '')})")
        elif where == "body" and err.get("type") in ("model_attributes_type", "dict_type"):
            parts.append("the body must be a JSON object (Content-Type: application/json)")
        else:
            parts.append(f"{where}: {err.get('msg', 'invalid')}")
    return "invalid request: " + "; ".join(parts), first


async def _api_error(_request: Request, exc: ApiError) -> JSONResponse:
    return exc.response()


async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
    message, param = _validation_message(exc)
    return error_response(422, message, param=param, code="invalid_request")


async def _http(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
    if exc.status_code == 400 and exc.detail == "There was an error parsing the body":
        return error_response(400, _parse_failure(exc.__cause__), code="invalid_body")
    return error_response(exc.status_code, str(exc.detail), headers=exc.headers)


async def _fault(_request: Request, exc: Exception) -> JSONResponse:
    # Reached only by a fault of the server (client mistakes are ApiErrors above); the
    # traceback goes to the server's log, not to the client.
    return error_response(
        500, "internal server error: the server's log has the details", code="internal_error"
    )


def add_error_handlers(app: FastAPI) -> None:
    """Answer every failure `app` meets in OpenAI's error shape."""
    app.exception_handler(ApiError)(_api_error)
    app.exception_handler(RequestValidationError)(_invalid)
    app.exception_handler(StarletteHTTPException)(_http)
    app.exception_handler(Exception)(_fault)
