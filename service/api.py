"""Plain helpers of the service: image uploads -> pixels, and the ``GET /model`` summary app."""
from __future__ import annotations

import logging
from pathlib import Path

import bentoml
import numpy as np
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from orthserve.preprocess import PreprocessSpec, preprocess
from service.validation import Limits, RequestError, read_image

log = logging.getLogger("orthserve.service")


def prepare_images(paths: list[Path], spec: PreprocessSpec, limits: Limits) -> np.ndarray:
    """Uploaded files -> float32 ``[N, 3, H, W]`` (decode_image + preprocess); 400 on any bad one."""
    if not paths:
        raise RequestError("no images given")
    if len(paths) > limits.max_images:
        raise RequestError(f"too many images: {len(paths)}, the limit is {limits.max_images}")
    single = len(paths) == 1
    return np.stack([preprocess(read_image(p, limits, None if single else i, spec.image_size), spec)
                     for i, p in enumerate(paths)])


def _dropped_connection(err: BaseException) -> bool:
    """The pooled connection to the encoder process closed under us (before or while reading the reply)."""
    import aiohttp

    return (isinstance(err, (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, ConnectionError))
            or (isinstance(err, RuntimeError) and "Connection closed" in str(err)))


async def call_encoder(encoder, pixels: np.ndarray, attempts: int = 3) -> np.ndarray:
    """``encoder.to_async.encode(pixels)`` (the batched image tower), retried when a pooled keep-alive
    connection to the encoder process turns out closed (aiohttp race with uvicorn's keep-alive timeout;
    under load aiohttp can also report it as ``RuntimeError("Connection closed.")`` while reading the
    reply).  Encoding is a pure function, so sending it again is safe."""
    for attempt in range(attempts):
        try:
            return await encoder.to_async.encode(pixels)
        except Exception as err:
            if attempt == attempts - 1 or not _dropped_connection(err):
                raise
            log.warning("connection to the image encoder dropped (%s: %s); sending again", type(err).__name__, err)
    raise AssertionError("unreachable")


def summary(svc) -> dict:
    """The manifest's summary plus what the service runs."""
    m = svc.artifact.manifest
    return {
        "model": m.get("model"), "pretrained": m.get("pretrained"), "method": m.get("method"),
        "classes": list(svc.artifact.classnames or []), "templates": list(svc.artifact.templates or []),
        "embed_dim": m.get("embed_dim"), "logit_scale": svc.artifact.logit_scale,
        "version": {"schema_version": m.get("schema_version"), "created": m.get("created"), **(m.get("versions") or {})},
        "variants": m.get("variants"), "preprocess": svc.artifact.preprocess.to_dict(),
        "text_runtime": {"providers": svc.text.encoder.providers, "variant": svc.text.encoder.variant},
        "label_cache": {"size": len(svc.text.cache), "max": svc.text.cache_size, "hits": svc.text.hits,
                        "misses": svc.text.misses},
        "limits": svc.limits.__dict__,
    }


async def model_info(request: Request) -> JSONResponse:
    svc = bentoml.get_current_service()
    if svc is None or not getattr(svc, "ready", False):
        return JSONResponse({"error": "model not loaded yet"}, status_code=503)
    return JSONResponse(summary(svc))


info_app = Starlette(routes=[Route("/model", model_info, methods=["GET"])])
