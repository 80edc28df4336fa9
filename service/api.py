"""Plain helpers of the service: image uploads -> pixels, and the ``GET /model`` summary app."""
from __future__ import annotations

from pathlib import Path

import bentoml
import numpy as np
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from orthserve.preprocess import PreprocessSpec, to_pixels
from .validation import Limits, RequestError, read_image


def prepare_images(paths: list[Path], spec: PreprocessSpec, limits: Limits) -> np.ndarray:
    """Uploaded files -> uint8 ``[N, 3, H, W]`` (decode, resize, crop: the image graph normalizes); 400 on any bad one."""
    if not paths:
        raise RequestError("no images given")
    if len(paths) > limits.max_images:
        raise RequestError(f"too many images: {len(paths)}, the limit is {limits.max_images}")
    single = len(paths) == 1
    return np.stack([to_pixels(read_image(p, limits, None if single else i, spec.image_size), spec)
                     for i, p in enumerate(paths)])


def summary(svc) -> dict:
    """The manifest's summary plus what the service runs."""
    m = svc.artifact.manifest
    return {
        "model": m.get("model"), "pretrained": m.get("pretrained"), "method": m.get("method"),
        "classes": list(svc.artifact.classnames or []), "templates": list(svc.artifact.templates or []),
        "embed_dim": m.get("embed_dim"), "logit_scale": svc.artifact.logit_scale,
        "version": {"schema_version": m.get("schema_version"), "created": m.get("created"), **(m.get("versions") or {})},
        "variants": m.get("variants"), "preprocess": svc.artifact.preprocess.to_dict(),
        "image_runtime": {"providers": svc.image.encoder.providers, "variant": svc.image.encoder.variant,
                          "max_batch_size": svc.batcher.max_batch,
                          # the visible CUDA device of the worker that answered (None on CPU)
                          "device_id": svc.image.encoder.device_id if svc.image.encoder.bound else None},
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
