"""RFC 9457 problem+json errors for every failure, including validation errors and unknown routes."""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DataError
from starlette.exceptions import HTTPException as StarletteHTTPException

PROBLEM = "application/problem+json"
log = logging.getLogger("cbd.api")


class ApiError(Exception):
    def __init__(self, status: int, detail: str, *, errors: list[dict[str, Any]] | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(detail)
        self.status, self.detail, self.errors, self.headers = status, detail, errors, headers


def not_found(what: str, ident: str) -> ApiError:
    return ApiError(404, f"{what} {ident!r} not found")


def problem(status: int, detail: str, errors: list[dict[str, Any]] | None = None,
            headers: dict[str, str] | None = None) -> JSONResponse:
    body: dict[str, Any] = {"type": "about:blank", "title": HTTPStatus(status).phrase, "status": status,
                            "detail": detail}
    if errors:
        body["errors"] = errors
    return JSONResponse(body, status_code=status, media_type=PROBLEM, headers=headers)


def _message(item: dict[str, Any]) -> str:
    """A validator's own words, without pydantic's "Value error, " before them."""
    if item.get("type") == "value_error" and "error" in item.get("ctx", {}):
        return str(item["ctx"]["error"])
    return item.get("msg", "invalid")


def _validation_errors(error: RequestValidationError) -> list[dict[str, Any]]:
    items = []
    for item in error.errors():
        location = [str(part) for part in item.get("loc", ()) if part not in ("body",)]
        items.append({"field": ".".join(location), "message": _message(item)})
    return items


def _located(field: str, message: str) -> str:
    """'field: message'; a message that starts with the field's name ('size must be ...') names it in full once."""
    name = field.rsplit(".", 1)[-1]
    return field + message[len(name):] if message.startswith(f"{name} ") else f"{field}: {message}"


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, error: ApiError) -> JSONResponse:
        return problem(error.status, error.detail, error.errors, error.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        errors = _validation_errors(error)
        detail = "; ".join(_located(e["field"] or "body", e["message"]) for e in errors)
        return problem(422, detail or "invalid request", errors)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, error: StarletteHTTPException) -> JSONResponse:
        return problem(error.status_code, str(error.detail), headers=getattr(error, "headers", None))

    @app.exception_handler(DataError)
    async def _unstorable(request: Request, error: DataError) -> JSONResponse:
        # input the database refuses to store or compare (a NUL byte in a string, say) is bad input, not a 5xx
        return problem(422, "a value in the request cannot be stored (NUL bytes and similar are not accepted)")

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, error: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return problem(500, "internal error; the server log has the details")


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries documenting problem+json errors of a route."""
    from app.schemas import Problem

    return {
        status: {"model": Problem, "description": HTTPStatus(status).phrase, "content": {PROBLEM: {}}}
        for status in statuses
    }


def problem_openapi(document: dict[str, Any]) -> dict[str, Any]:
    """Every 4xx/5xx of the OpenAPI document as problem+json (FastAPI documents its 422s as plain JSON)."""
    ref = {"$ref": "#/components/schemas/Problem"}
    for item in document["paths"].values():
        for operation in item.values():
            responses = operation.setdefault("responses", {})
            if operation.get("parameters") or operation.get("requestBody"):
                responses.setdefault("422", {"description": "Unprocessable Content"})
            # any route: a Host header not served (app.main.HostCheck), a body (or its declared length) too large
            responses.setdefault("400", {"description": "Bad Request"})
            responses.setdefault("413", {"description": "Content Too Large"})
            for code, response in responses.items():
                if code[0] in "45":
                    response["content"] = {PROBLEM: {"schema": ref}}
    schemas = document.get("components", {}).get("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    return document
