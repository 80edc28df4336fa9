"""The hostile-input suite: malformed or hostile requests to a live service and what each must get back.

Corrupt, truncated, huge, wrong types, odd encodings, hostile label strings, wrong content types, missing fields,
JSON bombs, many fields, HTTP-level garbage.  Every case must get: no 5xx and no dropped connection; a 4xx on an
API route carries JSON with a non-empty "error"; a 200 is a correct answer (shape, labels, finite sorted scores,
unit-norm embeddings); and what the case expects (a 4xx, a 200, or either where both are defensible).

Run as tests against the test server (``pytest -m live tests/test_hostile_inputs.py``), and by
``bench/bad_inputs.py`` against any server, with a load phase and a report.
"""
from __future__ import annotations

import io
import json
import math
import os
import socket
import struct
import time
import zlib
from pathlib import Path
from typing import Callable
from urllib.parse import urlsplit

import httpx
import numpy as np
from PIL import Image

API_ROUTES = ("/classify", "/classify_batch", "/embed_image", "/embed_text")


# --------------------------------------------------------------------------- payloads

def png(image: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG", **kw)
    return buf.getvalue()


def encode(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width x height`` with almost no data behind it."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def multipart(parts: list[tuple[str, str | None, str | None, bytes]], boundary: str = "orthbench") -> bytes:
    """Hand-built multipart body: (name, filename or None, content type or None, data)."""
    out = b""
    for name, filename, ctype, data in parts:
        disp = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename is not None else "")
        out += f"--{boundary}\r\nContent-Disposition: {disp}\r\n".encode("utf-8", "surrogatepass")
        if ctype:
            out += f"Content-Type: {ctype}\r\n".encode()
        out += b"\r\n" + data + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


def raw_http(url: str, request: bytes, timeout: float = 30) -> tuple[int, dict, bytes]:
    """Send raw bytes to the server; (status, headers, body) of whatever comes back (status 0: nothing)."""
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=timeout) as sock:
        sock.sendall(request)
        # Half-close only when the server is still waiting for bytes after 2 s (a body shorter than its
        # Content-Length): uvicorn drops the answer to a request whose client half-closed early, which
        # real clients do not do, and which made this suite flaky.
        sock.settimeout(2.0)
        data, closed = b"", False
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                block = sock.recv(65536)
            except socket.timeout:
                if data or closed:
                    break
                try:
                    sock.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                closed = True
                sock.settimeout(max(0.1, deadline - time.monotonic()))
                continue
            except ConnectionResetError:
                break
            if not block:
                break
            data += block
    if not data.startswith(b"HTTP/"):
        return 0, {}, data
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    if "chunked" in headers.get("transfer-encoding", ""):
        decoded, rest = b"", body
        while rest:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line.split(b";")[0] or b"0", 16)
            if size == 0:
                break
            decoded, rest = decoded + rest[:size], rest[size + 2:]
        body = decoded
    return int(lines[0].split()[1]), headers, body


class Case:
    def __init__(self, name: str, route: str, expect: str, send: Callable[[httpx.Client, "Ctx"], tuple[int, dict, bytes]],
                 what: str, labels: list[str] | None = None, count: int = 1, protocol: bool = False) -> None:
        self.name, self.route, self.expect, self.send, self.what = name, route, expect, send, what
        self.protocol = protocol  # refused by the HTTP server (uvicorn) before the app: no JSON body possible
        self.labels, self.count = labels, count  # for checking a 200: candidate labels, images / texts sent


class Ctx:
    def __init__(self, url: str, limits: dict, photo: bytes, classes: list[str]) -> None:
        self.url, self.limits, self.photo, self.classes = url, limits, photo, classes


def via(method: str, path: str, **kw) -> Callable:
    def send(client: httpx.Client, ctx: Ctx):
        r = client.request(method, path, **kw(ctx) if callable(kw) else kw)  # type: ignore[operator]
        return r.status_code, dict(r.headers), r.content
    return send


def post(path: str, build: Callable[[Ctx], dict]) -> Callable:
    def send(client: httpx.Client, ctx: Ctx):
        r = client.post(path, **build(ctx))
        return r.status_code, dict(r.headers), r.content
    return send


def raw(build: Callable[[Ctx], bytes]) -> Callable:
    def send(client: httpx.Client, ctx: Ctx):
        return raw_http(ctx.url, build(ctx))
    return send


def request_bytes(ctx: Ctx, path: str, body: bytes, ctype: str, extra: str = "") -> bytes:
    host = urlsplit(ctx.url).netloc
    return (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
            f"{extra}Connection: close\r\n\r\n").encode("latin-1") + body


def image_form(data: bytes, name: str = "image", filename: str = "photo.jpg", ctype: str = "image/jpeg", **fields) -> dict:
    return {"files": {name: (filename, data, ctype)}, "data": fields}


def labels_form(ctx: Ctx, labels_value: str, **extra) -> dict:
    return image_form(ctx.photo, labels=labels_value, **extra)


def corrupt(data: bytes, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    arr = bytearray(data)
    start = len(arr) // 3
    arr[start:start + 4000] = rng.integers(0, 256, 4000, dtype=np.uint8).tobytes()
    return bytes(arr)


# A pickle that would create PICKLE_MARKER if anything unpickled it (protocol 2: GLOBAL os.system, a string, REDUCE).
PICKLE_MARKER = Path("/tmp/orthserve-pickle-ran")
PICKLE_PAYLOAD = b"\x80\x02cos\nsystem\nX\x1f\x00\x00\x00touch " + str(PICKLE_MARKER).encode() + b"\x85R."


def cases() -> list[Case]:
    photo_img = lambda ctx: Image.open(io.BytesIO(ctx.photo)).convert("RGB").resize((120, 90))  # noqa: E731
    hostile = ["\u202eant\u202c", "نحلة", "蜜蜂", "🐝 bee 🐜", "e\u0301\u0301\u0301", "\u200b\u200bzero width",
               "<script>alert(1)</script>", "'; DROP TABLE labels; --", "{}", "{c}", "%s%n", "../../etc/passwd"]
    out = [
        # --- images
        Case("corrupt_jpeg_middle", "/classify", "any", post("/classify", lambda c: image_form(corrupt(c.photo))),
             "4000 random bytes written over the middle of a real JPEG", count=1),
        Case("truncated_jpeg", "/classify", "4xx", post("/classify", lambda c: image_form(c.photo[: len(c.photo) // 2])),
             "first half of a real JPEG"),
        Case("truncated_png", "/classify", "4xx",
             post("/classify", lambda c: image_form(png(photo_img(c))[:300], ctype="image/png")), "PNG cut after 300 bytes"),
        Case("zero_bytes", "/classify", "4xx", post("/classify", lambda c: image_form(b"")), "empty file upload"),
        Case("random_bytes", "/classify", "4xx",
             post("/classify", lambda c: image_form(np.random.default_rng(1).bytes(65536))), "64 KiB of random bytes"),
        Case("text_as_jpeg", "/embed_image", "4xx",
             post("/embed_image", lambda c: image_form(b"GIF89a is what I claim, but this is text.\n" * 20)),
             "text with a GIF magic prefix, sent as image/jpeg"),
        Case("decompression_bomb_png", "/classify", "4xx",
             post("/classify", lambda c: image_form(png(Image.new("1", (9000, 9000)), optimize=True), ctype="image/png")),
             "a few-KB PNG that decodes to 81 megapixels"),
        Case("png_header_claims_2g_pixels", "/classify", "4xx",
             post("/classify", lambda c: image_form(png_claiming(50000, 50000), ctype="image/png")),
             "PNG header claiming 50000x50000, 64 bytes of data"),
        Case("jpeg_header_only", "/classify", "4xx",
             post("/classify", lambda c: image_form(c.photo[:600])), "a JPEG's first 600 bytes (headers, no scan)"),
        Case("svg_xml", "/classify", "4xx",
             post("/classify", lambda c: image_form(b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "aaaa">]>'
                                                    b'<svg xmlns="http://www.w3.org/2000/svg"><image href="file:///etc/passwd"/></svg>',
                                                    ctype="image/svg+xml")),
             "SVG with an external entity and a file:// href"),
        Case("extreme_aspect_ratio", "/classify", "any",
             post("/classify", lambda c: image_form(png(Image.new("RGB", (10000, 1))), ctype="image/png")),
             "valid 10000x1 PNG (109 bytes): preprocessing resizes it to 2,240,000x224 before cropping"),
        Case("extreme_aspect_ratio_tall", "/classify", "4xx",
             post("/classify", lambda c: image_form(png(Image.new("RGB", (1, 60000))), ctype="image/png")),
             "valid 1x60000 PNG (a few hundred bytes): at 224 px, 224 x 13,440,000 pixels (9 GB) before cropping"),
        Case("animated_gif", "/classify", "200",
             post("/classify", lambda c: image_form(encode(photo_img(c).convert("P"), "GIF", save_all=True,
                                                           append_images=[photo_img(c).convert("P")] * 3), ctype="image/gif")),
             "4-frame animated GIF"),
        Case("tiff_16bit_gray", "/classify", "200",
             post("/classify", lambda c: image_form(encode(Image.fromarray((np.asarray(photo_img(c).convert("L"), np.uint16) * 257)),
                                                           "TIFF"), ctype="image/tiff")), "16-bit grayscale TIFF"),
        Case("bogus_exif_orientation", "/classify", "any",
             post("/classify", lambda c: image_form(encode(photo_img(c), "JPEG", exif=_exif(9)))),
             "JPEG with EXIF orientation 9 (invalid)"),
        Case("hostile_filename_and_type", "/classify", "200",
             post("/classify", lambda c: image_form(c.photo, filename="../../../etc/passwd\u202egpj.exe",
                                                    ctype="application/x-msdownload")),
             "real photo; filename with path traversal and RTL override, content type application/x-msdownload"),
        Case("null_byte_filename_raw", "/classify", "any",
             raw(lambda c: request_bytes(c, "/classify", multipart([("image", "a\x00b.jpg", "image/jpeg", c.photo)]),
                                         "multipart/form-data; boundary=orthbench")),
             "hand-built multipart with a NUL byte in the filename"),
        # --- sizes
        Case("body_over_limit", "/classify", "4xx",
             post("/classify", lambda c: image_form(os.urandom(c.limits["max_bytes"] + 4096))),
             "upload 4 KiB above the request byte limit (Content-Length known)"),
        Case("chunked_over_limit", "/classify", "4xx",
             post("/classify", lambda c: {"content": (os.urandom(1 << 20) for _ in range(c.limits["max_bytes"] // (1 << 20) + 2)),
                                          "headers": {"content-type": "multipart/form-data; boundary=x"}}),
             "chunked upload (no Content-Length) above the byte limit"),
        Case("too_many_images_batch", "/classify_batch", "4xx",
             post("/classify_batch", lambda c: {"files": [("images", (f"{i}.png", png(Image.new("RGB", (2, 2))), "image/png"))
                                                          for i in range(c.limits["max_images"] + 1)]}),
             "one image more than the per-request limit"),
        Case("many_files_batch", "/classify_batch", "4xx",
             post("/classify_batch", lambda c: {"files": [("images", (f"{i}.png", b"x", "image/png")) for i in range(1500)]}),
             "1500 one-byte file parts"),
        Case("many_form_fields", "/classify", "4xx",
             post("/classify", lambda c: {"files": {"image": ("a.jpg", c.photo, "image/jpeg")},
                                          "data": {f"f{i}": "x" for i in range(3000)}}), "photo plus 3000 text fields"),
        Case("batch_one_bad_image", "/classify_batch", "4xx",
             post("/classify_batch", lambda c: {"files": [("images", ("a.jpg", c.photo, "image/jpeg")),
                                                          ("images", ("b.jpg", b"garbage", "image/jpeg"))]}),
             "classify_batch with a good and a bad image"),
        # --- fields and content types
        Case("missing_image_field", "/classify", "4xx",
             post("/classify", lambda c: {"files": {"picture": ("a.jpg", c.photo, "image/jpeg")}}), "file under another name"),
        Case("image_as_http_url", "/classify", "4xx",
             post("/classify", lambda c: {"data": {"image": "http://127.0.0.1:9/x.jpg"}, "files": {"o": ("o", b"o")}}),
             "image field as a text URL (must not be fetched)"),
        Case("image_as_file_url", "/embed_image", "4xx",
             post("/embed_image", lambda c: {"data": {"image": "file:///etc/passwd"}, "files": {"o": ("o", b"o")}}),
             "image field as a file:// URL"),
        Case("image_as_local_path", "/classify", "4xx",
             post("/classify", lambda c: {"data": {"image": "/etc/passwd"}, "files": {"o": ("o", b"o")}}),
             "image field as a local path string"),
        Case("two_image_fields_single_route", "/classify", "any",
             post("/classify", lambda c: {"files": [("image", ("a.jpg", c.photo, "image/jpeg")),
                                                    ("image", ("b.jpg", c.photo, "image/jpeg"))]}),
             "two 'image' files on /classify"),
        Case("json_body_on_classify", "/classify", "4xx",
             post("/classify", lambda c: {"json": {"image": "/etc/passwd", "labels": ["a"]}}), "JSON instead of multipart"),
        Case("raw_jpeg_body", "/classify", "4xx",
             post("/classify", lambda c: {"content": c.photo, "headers": {"content-type": "image/jpeg"}}),
             "the photo as the raw body"),
        Case("no_content_type", "/classify", "4xx",
             raw(lambda c: (f"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Length: {len(c.photo)}\r\nConnection: close\r\n\r\n"
                            ).encode() + c.photo), "no Content-Type header at all"),
        Case("multipart_without_boundary", "/classify", "4xx",
             post("/classify", lambda c: {"content": b"--x\r\n\r\n", "headers": {"content-type": "multipart/form-data"}}),
             "multipart content type without a boundary"),
        Case("multipart_garbage", "/classify", "4xx",
             post("/classify", lambda c: {"content": b"--x\r\ngarbage\r\n\x00\xff" * 50,
                                          "headers": {"content-type": "multipart/form-data; boundary=x"}}), "garbage body"),
        Case("multipart_unterminated", "/classify", "4xx",
             post("/classify", lambda c: {"content": multipart([("image", "a.jpg", "image/jpeg", c.photo)])[:-40],
                                          "headers": {"content-type": "multipart/form-data; boundary=orthbench"}}),
             "multipart whose closing boundary is missing"),
        Case("odd_charset_in_content_type", "/classify", "any",
             post("/classify", lambda c: {"content": multipart([("image", "a.jpg", "image/jpeg", c.photo)]),
                                          "headers": {"content-type": "multipart/form-data; boundary=orthbench; charset=utf-7"}}),
             "valid multipart, content type with charset=utf-7"),
        Case("bad_content_length_header", "/classify", "4xx",
             raw(lambda c: b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=x\r\n"
                           b"Content-Length: abc\r\nConnection: close\r\n\r\n--x--\r\n"),
             "Content-Length: abc (rejected by the HTTP server before the app: plain-text 400)", protocol=True),
        Case("get_on_api_route", "/classify", "4xx", via("GET", "/classify"), "GET on a POST route"),
        Case("huge_header", "/classify", "any",
             post("/classify", lambda c: {**image_form(c.photo), "headers": {"x-big": "a" * 200_000}}), "a 200 KB header"),
        # --- labels and top_k
        Case("labels_comma_separated", "/classify", "200", post("/classify", lambda c: labels_form(c, "ant,bee")),
             "labels=ant,bee (the documented comma form)", labels=["ant", "bee"]),
        Case("labels_json_object", "/classify", "4xx", post("/classify", lambda c: labels_form(c, '{"ant": 1}')), "an object"),
        Case("labels_numbers_and_null", "/classify", "4xx", post("/classify", lambda c: labels_form(c, "[1, null, true]")),
             "non-string labels"),
        Case("labels_nested_json_bomb", "/classify", "4xx",
             post("/classify", lambda c: labels_form(c, "[" * 200_000 + "]" * 200_000)), "labels nested 200,000 deep"),
        Case("labels_hostile_unicode", "/classify", "200",
             post("/classify", lambda c: labels_form(c, json.dumps(hostile), top_k=str(len(hostile)))),
             "RTL override, Arabic, CJK, emoji, combining marks, zero-width, HTML, SQL, format strings, path",
             labels=hostile),
        Case("labels_null_bytes", "/classify", "any",
             post("/classify", lambda c: labels_form(c, json.dumps(["ant\u0000", "\u0000bee", "x\u0000\u0000y"]))),
             "labels containing NUL characters", labels=["ant\u0000", "\u0000bee", "x\u0000\u0000y"]),
        Case("labels_lone_surrogate", "/classify", "any",
             post("/classify", lambda c: labels_form(c, '["\\ud800 ant", "bee"]')),
             "a label with a lone UTF-16 surrogate (JSON escape)", labels=["\ud800 ant", "bee"]),
        Case("labels_very_long", "/classify", "4xx",
             post("/classify", lambda c: labels_form(c, json.dumps(["ant", "b" * 100_000]))), "a 100,000-character label"),
        Case("labels_too_many", "/classify", "4xx",
             post("/classify", lambda c: labels_form(c, json.dumps([f"l{i}" for i in range(20_000)]))), "20,000 labels"),
        Case("labels_duplicate_after_strip", "/classify", "4xx",
             post("/classify", lambda c: labels_form(c, '["ant", " ant\\t"]')), "'ant' and ' ant\\t'"),
        Case("labels_field_twice", "/classify", "4xx",
             post("/classify", lambda c: {"files": {"image": ("a.jpg", c.photo, "image/jpeg")},
                                          "data": {"labels": ['["ant"]', '["bee"]']}}), "labels sent as two fields"),
        Case("labels_invalid_utf8", "/classify", "any",
             post("/classify", lambda c: {"content": multipart([("image", "a.jpg", "image/jpeg", c.photo),
                                                               ("labels", None, None, b'["\xff\xfe ant", "bee"]')]),
                                          "headers": {"content-type": "multipart/form-data; boundary=orthbench"}}),
             "labels field with invalid UTF-8 bytes (Starlette decodes form text as latin-1 then)"),
        Case("top_k_5000_digits", "/classify", "4xx", post("/classify", lambda c: image_form(c.photo, top_k="9" * 5000)),
             "top_k with 5000 digits"),
        Case("top_k_float_string", "/classify", "4xx", post("/classify", lambda c: image_form(c.photo, top_k="1e3")), "top_k=1e3"),
        Case("top_k_negative", "/classify", "4xx", post("/classify", lambda c: image_form(c.photo, top_k="-1")), "top_k=-1"),
        # --- /embed_text
        Case("embed_text_json_bomb_nested", "/embed_text", "4xx",
             post("/embed_text", lambda c: {"content": b'{"texts": ' + b"[" * 200_000 + b"]" * 200_000 + b"}",
                                            "headers": {"content-type": "application/json"}}), "JSON nested 200,000 deep"),
        Case("embed_text_many_texts", "/embed_text", "4xx",
             post("/embed_text", lambda c: {"json": {"texts": ["a"] * 200_000}}), "200,000 texts"),
        Case("embed_text_utf16_body", "/embed_text", "any",
             post("/embed_text", lambda c: {"content": json.dumps({"texts": ["a bee"]}).encode("utf-16"),
                                            "headers": {"content-type": "application/json"}}), "UTF-16 encoded JSON body",
             count=1),
        Case("embed_text_invalid_utf8", "/embed_text", "4xx",
             post("/embed_text", lambda c: {"content": b'{"texts": ["\xff\xfe"]}', "headers": {"content-type": "application/json"}}),
             "invalid UTF-8 in a JSON string"),
        Case("embed_text_lone_surrogate", "/embed_text", "any",
             post("/embed_text", lambda c: {"content": b'{"texts": ["\\udc00 bee", "ok"]}',
                                            "headers": {"content-type": "application/json"}}), "lone surrogate escape", count=2),
        Case("embed_text_hostile_unicode", "/embed_text", "200",
             post("/embed_text", lambda c: {"json": {"texts": hostile + ["a\u0000b"]}}), "hostile strings incl. NUL",
             count=len(hostile) + 1),
        Case("embed_text_nested_lists", "/embed_text", "4xx", post("/embed_text", lambda c: {"json": {"texts": [["a"], ["b"]]}}),
             "texts as a list of lists"),
        Case("embed_text_top_level_array", "/embed_text", "4xx", post("/embed_text", lambda c: {"json": ["a", "b"]}),
             "a JSON array instead of an object"),
        Case("embed_text_nan_and_huge_numbers", "/embed_text", "4xx",
             post("/embed_text", lambda c: {"content": b'{"texts": NaN, "x": 1e999999}', "headers": {"content-type": "application/json"}}),
             "NaN and an overflowing number"),
        Case("embed_text_duplicate_keys", "/embed_text", "4xx",
             post("/embed_text", lambda c: {"content": b'{"texts": ["ok"], "texts": 5}', "headers": {"content-type": "application/json"}}),
             "the key 'texts' twice, last one not a list"),
        Case("embed_text_wrong_content_type", "/embed_text", "4xx",
             post("/embed_text", lambda c: {"content": b'{"texts": ["a"]}', "headers": {"content-type": "text/plain"}}),
             "JSON sent as text/plain"),
        Case("bentoml_pickle_body", "/embed_text", "4xx",
             post("/embed_text", lambda c: {"content": PICKLE_PAYLOAD,
                                            "headers": {"content-type": "application/vnd.bentoml+pickle"}}),
             "a pickle in BentoML's inter-service format: must never be unpickled from a public request"),
        Case("embed_text_extra_fields", "/embed_text", "any",
             post("/embed_text", lambda c: {"json": {"texts": ["a"], **{f"k{i}": i for i in range(5000)}}}),
             "valid texts plus 5000 unknown keys", count=1),
    ]
    return out


def _exif(orientation: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif


# --------------------------------------------------------------------------- checks

def check_ok(case: Case, body: dict, ctx: Ctx) -> str | None:
    """None when a 200 answer is correct for what was sent, else the reason."""
    def check_predictions(preds, labels) -> str | None:
        if not isinstance(preds, list) or not preds:
            return "no predictions"
        names = [p.get("label") for p in preds]
        scores = [p.get("score") for p in preds]
        if labels is not None and not set(names) <= set(labels):
            return f"labels {names!r} not among those sent"
        if not all(isinstance(s, float) and math.isfinite(s) and 0 <= s <= 1 for s in scores):
            return f"bad scores {scores}"
        if scores != sorted(scores, reverse=True) or sum(scores) > 1 + 1e-6:
            return "scores not sorted or sum above 1"
        return None

    if case.route == "/classify":
        labels = case.labels if case.labels is not None else None
        if labels is not None:  # the server strips whitespace
            labels = [l.strip() for l in labels]
        return check_predictions(body.get("predictions"), labels)
    if case.route == "/classify_batch":
        results = body.get("results")
        if not isinstance(results, list) or len(results) != case.count:
            return "wrong number of results"
        return next((r for r in (check_predictions(x.get("predictions"), None) for x in results) if r), None)
    if case.route == "/embed_image":
        emb = np.asarray(body.get("embedding"), dtype=np.float64)
        return None if emb.ndim == 1 and emb.size == body.get("dim") and abs(np.linalg.norm(emb) - 1) < 1e-3 else "bad embedding"
    if case.route == "/embed_text":
        emb = np.asarray(body.get("embeddings"), dtype=np.float64)
        if emb.ndim != 2 or emb.shape[0] != case.count:
            return f"expected {case.count} embeddings, got shape {emb.shape}"
        return None if np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-3) else "embeddings not unit norm"
    return None


def run_case(client: httpx.Client, case: Case, ctx: Ctx) -> dict:
    start = time.perf_counter()
    try:
        status, headers, content = case.send(client, ctx)
    except (httpx.HTTPError, OSError) as err:
        status, headers, content = 0, {}, f"{type(err).__name__}: {err}".encode()
    seconds = time.perf_counter() - start
    ctype = headers.get("content-type", "")
    text = content.decode("utf-8", "replace")
    body = None
    if ctype.startswith("application/json"):
        try:
            body = json.loads(text)
        except ValueError:
            body = None
    problems = []
    if status == 0:
        problems.append("no HTTP response (connection dropped or refused)")
    elif status >= 500:
        problems.append(f"server error {status}")
    elif 400 <= status < 500:
        message = body.get("error") if isinstance(body, dict) else None
        if not (isinstance(message, str) and message.strip()):
            json_required = case.route in API_ROUTES and status not in (404, 405) and not case.protocol
            if json_required:
                problems.append("4xx without a JSON {'error': message} body")
        if case.expect == "200":
            problems.append(f"expected a correct 200, got {status}")
    elif status == 200:
        if not isinstance(body, dict):
            problems.append("200 without a JSON object")
        elif reason := check_ok(case, body, ctx):
            problems.append(f"200 but wrong: {reason}")
        if case.expect == "4xx":
            problems.append("expected a 4xx, got 200")
    else:
        problems.append(f"unexpected status {status}")
    return {"name": case.name, "route": case.route, "what": case.what, "expect": case.expect, "status": status,
            "content_type": ctype.split(";")[0], "response": text[:300], "seconds": round(seconds, 3),
            "ok": not problems, "problems": problems}
