"""Request checks: every bad input becomes a 4xx with a JSON ``{"error": ...}`` body.

The limits themselves are settings (``service/settings.py``: ORTHSERVE_MAX_BYTES, ..._PIXELS, ..._LABELS,
..._LABEL_CHARS, ..._IMAGES, ..._TEXTS).
"""
from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any, Awaitable, Callable, Sequence

from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse

from orthserve.classnames import ClassNamesError, parse_labels
from orthserve.preprocess import ImageDecodeError, decode_image
from .settings import Limits, settings  # noqa: F401  (Limits: re-exported for the service's modules)

DEFAULT_TOP_K = 5
Routes = dict  # {route: upload field name, or None for a JSON body}: from service.service.guarded_routes


class RequestError(ValueError):
    """A client error: HTTP ``status`` with a readable ``message``."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.message, self.status = message, status


def error_response(message: str, status: int) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def json_errors(func: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """Decorate an API method: :class:`RequestError` and undecodable images -> 4xx JSON responses."""

    @functools.wraps(func)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return await func(*args, **kwargs)
        except RequestError as err:
            return error_response(err.message, err.status)
        except ImageDecodeError as err:
            return error_response(str(err), 400)

    return wrapper


def check_texts(texts: Sequence[str] | None, limits: Limits, what: str = "labels", maximum: int | None = None) -> list[str]:
    """Non-empty list of distinct, non-blank strings of bounded length and count; whitespace stripped."""
    maximum = maximum or limits.max_labels
    if texts is None or len(texts) == 0:
        raise RequestError(f"{what} is an empty list: give at least one")
    if len(texts) > maximum:
        raise RequestError(f"too many {what}: {len(texts)}, the limit is {maximum}")
    cleaned = [t.strip() if isinstance(t, str) else t for t in texts]
    for i, text in enumerate(cleaned):
        if not isinstance(text, str) or not text:
            raise RequestError(f"{what}[{i}] is empty: every entry must be a non-blank string")
        if len(text) > limits.max_label_chars:
            raise RequestError(f"{what}[{i}] is {len(text)} characters long, the limit is {limits.max_label_chars}")
    if what == "labels" and len(set(cleaned)) != len(cleaned):
        dupes = sorted({t for t in cleaned if cleaned.count(t) > 1})
        raise RequestError(f"duplicate labels: {dupes}; each label must appear once")
    return cleaned


def check_top_k(top_k: int | None, n_classes: int) -> int:
    """``None`` -> min(5, n); above the number of candidates -> all of them; 0 or negative -> 400."""
    if top_k is None:
        return min(DEFAULT_TOP_K, n_classes)
    if top_k < 1:
        raise RequestError(f"top_k must be at least 1, got {top_k}")
    return min(top_k, n_classes)


def read_image(path: Path, limits: Limits, index: int | None = None, image_size: int | None = None):
    """An uploaded file -> RGB Pillow image, or a 400 naming which upload is bad (limits: see decode_image)."""
    where = "image" if index is None else f"images[{index}]"
    try:
        return decode_image(Path(path).read_bytes(), limits.max_pixels, image_size)
    except ImageDecodeError as err:
        raise RequestError(f"{where}: {err}") from err


def parse_labels_field(text: str) -> list[str]:
    """The ``labels`` form field (a JSON list or comma-separated names, as ``export --labels``) -> names; 400 if neither."""
    try:
        return parse_labels(text)
    except ClassNamesError as err:
        raise RequestError(str(err)) from err


# The ``labels`` form field as the API receives it: BentoML JSON-decodes every text field it can
# ('["a", "b"]' -> a list, '0' -> 0) and passes the rest as text; :func:`labels_from_form` undoes that.
LabelsField = Any


def labels_from_form(value: LabelsField) -> list[str] | None:
    """``labels`` after BentoML's decoding -> the names (the guard has checked the raw text already)."""
    if value is None:
        return None
    if isinstance(value, str):
        return parse_labels_field(value)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return [v.strip() for v in value]
    if isinstance(value, list):
        raise RequestError('labels: expected a JSON list of strings, e.g. ["cat", "dog"], or names separated by commas')
    return [json.dumps(value, ensure_ascii=False)]  # e.g. labels=0: one name that JSON read as a number


def check_form_options(form) -> JSONResponse | None:
    """``labels``: one text field (JSON list or comma-separated names); ``top_k``: an integer."""
    labels = form.getlist("labels")
    if len(labels) > 1:
        return error_response('send labels as one form field: a JSON list, e.g. labels=["cat", "dog"], or '
                              "names separated by commas, e.g. labels=cat, dog", 400)
    if labels:
        if not isinstance(labels[0], str):
            return error_response("labels must be a text field, not a file upload", 400)
        try:
            check_texts(parse_labels_field(labels[0]), settings().limits)
        except RequestError as err:
            return error_response(err.message, err.status)
    top_k = form.get("top_k")
    if top_k is not None:
        try:
            int(top_k) if isinstance(top_k, str) else int("x")
        except ValueError:
            return error_response(f"top_k must be an integer, got {str(top_k)[:50]!r}", 400)
    return None


def check_json_fields(path: str, value: Any) -> JSONResponse | None:
    """The JSON routes' bodies in our words (not pydantic's error list): ``{"texts": [strings]}``."""
    example = '{"texts": ["a photo of a cat", "a dog"]}'
    if not isinstance(value, dict):
        return error_response(f"{path} takes a JSON object, e.g. {example}", 400)
    unknown = sorted(set(value) - {"texts"})
    if unknown:
        return error_response(f"{path}: unknown field(s) {unknown}; it takes only 'texts', e.g. {example}", 400)
    texts = value.get("texts")
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        return error_response(f"{path}: 'texts' must be a list of strings, e.g. {example}", 400)
    try:
        limits = settings().limits
        check_texts(texts, limits, "texts", limits.max_texts)
    except RequestError as err:
        return error_response(err.message, err.status)
    return None


class RequestGuard:
    """ASGI middleware in front of the API routes: byte limit (413), content type (415), and multipart
    forms whose image fields are real file uploads (BentoML would otherwise treat a text field as a URL
    to download).  The body is buffered (at most ``max_bytes``) and replayed to the app."""

    DRAIN_FACTOR = 8  # an oversized body up to this many times the limit is read and dropped before the 413

    def __init__(self, app: Callable, routes: Routes, max_bytes: int | None = None) -> None:
        self.app = app
        self.routes = routes  # every API route: a new endpoint gets its limits without an edit here
        self.max_bytes = max_bytes or settings().limits.max_bytes

    async def refuse_too_big(self, scope: dict, receive: Callable, send: Callable, received: int,
                             more: bool = True) -> None:
        """Answer 413 once the client has sent its body (up to ``DRAIN_FACTOR`` x the limit, read and dropped,
        never kept): clients that send the whole body before reading, such as Python's urllib, otherwise hit
        a closed connection instead of the answer. Larger bodies get the 413 at once, then the connection closes.
        ``more``: whether the client has more of the body to send."""
        while more and received <= self.DRAIN_FACTOR * self.max_bytes:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            received += len(message.get("body", b""))
            more = message.get("more_body", False)
        await error_response(f"request body above the limit of {self.max_bytes} bytes", 413)(scope, receive, send)

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or scope["method"] != "POST" or path not in self.routes:
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        try:
            declared = int(headers.get("content-length", "0"))
            if declared > self.max_bytes:  # past the drain bound: no point reading any of it
                drained = 0 if declared <= self.DRAIN_FACTOR * self.max_bytes else declared
                return await self.refuse_too_big(scope, receive, send, drained)
        except ValueError:
            return await error_response("bad Content-Length header", 400)(scope, receive, send)
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_bytes:
                return await self.refuse_too_big(scope, receive, send, len(body), more)
        if problem := await self.check(scope, path, headers.get("content-type", ""), bytes(body)):
            return await problem(scope, receive, send)
        sent = False

        async def replay() -> dict:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def check(self, scope: dict, path: str, content_type: str, body: bytes) -> JSONResponse | None:
        media = content_type.split(";")[0].strip().lower()
        field = self.routes[path]
        if field is None:  # a JSON body
            if media != "application/json":
                return error_response(f"{path} takes application/json, got {media or 'no content type'}", 415)
            try:
                value = json.loads(body or b"null")
            except ValueError as err:
                return error_response(f"request body is not valid JSON: {err}", 400)
            except RecursionError:  # e.g. [[[[...]]]] 100,000 deep: was an unhandled 500
                return error_response("request body is not valid JSON: nested too deeply", 400)
            return check_json_fields(path, value)
        if media != "multipart/form-data":
            return error_response(f"{path} takes multipart/form-data with the image as a file field "
                                  f"'{field}', got {media or 'no content type'}", 415)

        async def once() -> dict:
            return {"type": "http.request", "body": body, "more_body": False}

        try:
            async with Request(scope, once).form() as form:
                values = form.getlist(field)
                if not values:
                    return error_response(f"missing file field '{field}'", 400)
                if not all(isinstance(v, UploadFile) for v in values):
                    return error_response(f"'{field}' must be a file upload, not a text field", 400)
                return check_form_options(form)
        except Exception as err:  # malformed multipart, too many parts, part too large
            detail = getattr(err, "detail", None) or getattr(err, "message", None) or str(err)
            return error_response(f"malformed multipart form: {detail}", 400)
        return None
