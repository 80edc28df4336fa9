"""BentoML service: `bentoml serve service.service:Classifier` (model from ORTHSERVE_MODEL, see runtime.py)."""
from __future__ import annotations

import os
import typing
from pathlib import Path

import anyio
import bentoml
import numpy as np

from orthserve.artifact import Artifact, ArtifactError
from .api import info_app, prepare_images
from .balance import ConnectionBalancer
from .batching import Batcher
from .settings import settings
from .runtime import (ImageModel, TextModel, default_max_batch, default_workers, open_artifact, rank, resolve_model,
                      serving_gpus)
from .openapi import DocsPages
from .validation import (LabelsField, RequestError, RequestGuard, check_texts, check_top_k, json_errors,
                                labels_from_form)

# Threads for decoding, preprocessing and the text tower.  anyio's default is 40; on a small machine that
# only adds contention, and each thread's malloc arena adds resident memory (about +250 MB under load).
WORK_THREADS = settings().work_threads or max(4, 2 * (os.cpu_count() or 1))

# Checked when `bentoml serve` loads this module, before any worker starts: a missing, truncated or
# tampered artifact stops the server at once (exit 1, the reason printed) instead of leaving workers
# that never become ready.  Each worker process imports this module too and reuses that check.
try:
    _CHECKED = open_artifact()
except (ArtifactError, FileNotFoundError, ValueError) as err:
    if settings().debug:
        raise
    raise SystemExit(f"orthserve: cannot serve: {err}  (ORTHSERVE_DEBUG=1 shows the traceback)") from None


def artifact() -> Artifact:
    """The artifact ORTHSERVE_MODEL names: the one checked at import, unless the setting changed since."""
    return _CHECKED if resolve_model().resolve() == Path(_CHECKED.root).resolve() else open_artifact()


def service_config(workers: int, gpus: int, max_batch: int) -> dict:
    """``@bentoml.service``'s settings for ``workers`` processes on ``gpus`` GPUs (0: CPU), batches of ``max_batch``.

    With GPUs the service asks BentoML for them: BentoML hands the workers their CUDA_VISIBLE_DEVICES, and each
    worker opens its sessions on device worker_index - 1 (runtime.worker_device).

    ``concurrency`` is the number of requests in flight at which a replica is full, for BentoCloud's autoscaler.
    Each worker's Batcher (service/batching.py) runs one batch of up to ``max_batch`` images while the next one
    gathers, so ``max_batch`` single-image requests per worker are what its batches can hold; past
    ``workers x max_batch`` requests only wait longer for the same throughput, and another replica helps more.
    (BentoML's docs: with adaptive batching, concurrency = the batch size, times the workers batching in
    parallel.)  One GPU: 256; CPU: 32 per worker, where batches gain less (2 CPUs were saturated by 8 clients,
    bench/results/service_vs_raw_vitb32.md): lower it for latency with ORTHSERVE_MAX_BATCH_SIZE, or on BentoCloud
    with config_overrides (deploy/bentocloud.yaml).  ``max_concurrency`` is the hard limit (429 beyond it), split
    evenly over the workers by BentoML: 256 as before on CPU and on one GPU, a full batch per worker on several."""
    concurrency = workers * max_batch
    return {"workers": workers, "resources": {"gpu": gpus} if gpus else {},
            "traffic": {"timeout": 60, "concurrency": concurrency, "max_concurrency": max(256, concurrency)}}


WORKERS = default_workers()


@bentoml.asgi_app(info_app, path="/")
@bentoml.service(**service_config(WORKERS, serving_gpus(), default_max_batch()))
class Classifier:
    """Zero-shot (labels + templates) or fine-tuned classes, embeddings; bad input gets a 4xx."""

    def __init__(self) -> None:
        self.limits = settings().limits
        self.artifact = artifact()
        self.image = ImageModel(self.artifact)
        # adaptive batching of the image tower, batches assembled in its pinned buffer on a GPU; one per worker
        # process (__init__ runs in each), so each GPU worker batches only for its own device
        self.batcher = Batcher(self.image.encode, self.image.max_batch, self.image.staging)
        self.text = TextModel(self.artifact, settings().label_cache)
        self.name, self.ready = str(self.artifact.manifest.get("model")), True
        self._threads: anyio.CapacityLimiter | None = None  # made on first use, inside the event loop

    async def in_thread(self, func, *args):
        self._threads = self._threads or anyio.CapacityLimiter(WORK_THREADS)
        return await anyio.to_thread.run_sync(func, *args, limiter=self._threads)

    def __is_ready__(self) -> bool:
        return self.ready

    async def embed(self, images: list[Path]) -> np.ndarray:
        pixels = await self.in_thread(prepare_images, images, self.artifact.preprocess, self.limits)
        return await self.batcher(pixels)

    async def candidates(self, labels: LabelsField) -> tuple[list[str], np.ndarray]:
        labels = labels_from_form(labels)
        if labels is None:
            if self.artifact.class_embeddings is None:
                raise RequestError("this model has no classes of its own: pass 'labels'")
            return list(self.artifact.classnames), self.artifact.class_embeddings
        labels = check_texts(labels, self.limits)
        cached = self.text.cached(labels)  # a repeated label set skips the hop to a worker thread
        return labels, cached if cached is not None else await self.in_thread(self.text.label_embeddings, labels)

    @bentoml.api
    @json_errors
    async def classify(self, image: Path, labels: LabelsField = None, top_k: int | None = None) -> dict:
        """One image -> predictions over ``labels`` (zero-shot) or the model's classes."""
        names, class_emb = await self.candidates(labels)
        k = check_top_k(top_k, len(names))
        emb = await self.embed([image])
        return {"predictions": rank(emb, class_emb, self.artifact.logit_scale, names, k)[0], "model": self.name}

    @bentoml.api
    @json_errors
    async def classify_batch(self, images: list[Path], labels: LabelsField = None, top_k: int | None = None) -> dict:
        """Several images, same options -> one result per image, in order."""
        names, class_emb = await self.candidates(labels)
        k = check_top_k(top_k, len(names))
        ranked = rank(await self.embed(images), class_emb, self.artifact.logit_scale, names, k)
        return {"results": [{"predictions": r} for r in ranked], "model": self.name}

    @bentoml.api
    @json_errors
    async def embed_image(self, image: Path) -> dict:
        """One image -> its L2-normalized float32 embedding."""
        emb = (await self.embed([image]))[0]
        return {"embedding": emb.tolist(), "dim": int(emb.shape[0]), "model": self.name}

    @bentoml.api
    @json_errors
    async def embed_text(self, texts: list[str]) -> dict:
        """JSON ``{"texts": [...]}`` -> L2-normalized float32 embeddings (no templates)."""
        texts = check_texts(texts, self.limits, "texts", self.limits.max_texts)
        emb = await self.in_thread(self.text.embed, texts)
        return {"embeddings": emb.tolist(), "dim": int(emb.shape[1]), "model": self.name}


def guarded_routes(service) -> dict[str, str | None]:
    """Every API route of ``service`` and its upload field (None: a JSON body), read from the methods' type hints."""
    routes = {}
    for api in service.apis.values():
        hints = typing.get_type_hints(api.func)
        files = [name for name, hint in hints.items() if hint in (Path, list[Path])]
        routes[api.route] = files[0] if files else None
    return routes


Classifier.add_asgi_middleware(RequestGuard, routes=guarded_routes(Classifier))
Classifier.add_asgi_middleware(DocsPages)  # our root page and OpenAPI document (service/openapi.py)
Classifier.add_asgi_middleware(ConnectionBalancer, workers=WORKERS)  # keep-alive clients spread over the workers
