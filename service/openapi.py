"""The service's root page and OpenAPI document (``GET /``, ``GET /docs.json``).

BentoML generates the document from the API signatures; this module corrects it to what the service
really accepts and answers (labels as one text field in two forms, our ``{"error": ...}`` bodies with
400 / 413 / 415, the result shapes, ``GET /model``) and gives it the project's title and examples.
Served by a small ASGI middleware, so BentoML's own routes stay as they are.
"""
from __future__ import annotations

import copy
import html
import json
from typing import Callable

TITLE = "orthserve"
DESCRIPTION = """Zero-shot and fine-tuned image classification and embeddings with CLIP models adapted by orthserve
(ONNX Runtime; GPU where there is one).

```bash
# zero-shot over your labels (a JSON list, or names separated by commas)
curl -F image=@photo.jpg -F 'labels=["golden retriever", "tabby cat"]' -F top_k=2 localhost:3000/classify
curl -F image=@photo.jpg -F 'labels=golden retriever, tabby cat' localhost:3000/classify
# the model's own classes (an exported fine-tuned run)
curl -F image=@photo.jpg localhost:3000/classify
# several images, one answer each
curl -F images=@a.jpg -F images=@b.jpg -F 'labels=ant, bee' localhost:3000/classify_batch
# embeddings
curl -F image=@photo.jpg localhost:3000/embed_image
curl -H 'Content-Type: application/json' -d '{"texts": ["a photo of a dog"]}' localhost:3000/embed_text
# what is loaded
curl localhost:3000/model
```

Every bad request gets a 4xx with a JSON body `{"error": "what is wrong"}`: 400 bad input, 413 body over
the limit, 415 wrong content type.
"""

ERROR = {"$ref": "#/components/schemas/Error"}
# "some character Python's str.strip() keeps": ECMA's \s lacks \x1c-\x1f and \x85, which strip() removes
NON_BLANK = r"[^\s\x1c-\x1f\x85]"
LABELS = {"type": "string", "minLength": 1, "pattern": r"[^\s\x1c-\x1f\x85,\[\]\"]",
          "description": 'Candidate class names: a JSON list (["golden retriever", "tabby cat"]) or names separated by '
                         "commas (golden retriever, tabby cat). Each at most 300 characters, no duplicates. Leave out "
                         "to use the model's own classes (a fine-tuned model)."}
TOP_K = {"type": "integer", "minimum": 1, "description": "How many of the best classes to return (default 5; "
                                                           "a larger number than there are classes returns all)."}
SCHEMAS = {
    "Error": {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}},
    "Prediction": {"type": "object", "required": ["label", "score"],
                   "properties": {"label": {"type": "string"}, "score": {"type": "number", "minimum": 0, "maximum": 1}}},
    "Classification": {"type": "object", "required": ["predictions", "model"], "properties": {
        "predictions": {"type": "array", "items": {"$ref": "#/components/schemas/Prediction"}},
        "model": {"type": "string"}}},
    "BatchClassification": {"type": "object", "required": ["results", "model"], "properties": {
        "results": {"type": "array", "items": {"type": "object", "required": ["predictions"], "properties": {
            "predictions": {"type": "array", "items": {"$ref": "#/components/schemas/Prediction"}}}}},
        "model": {"type": "string"}}},
    "ImageEmbedding": {"type": "object", "required": ["embedding", "dim", "model"], "properties": {
        "embedding": {"type": "array", "items": {"type": "number"}}, "dim": {"type": "integer"},
        "model": {"type": "string"}}},
    "TextEmbeddings": {"type": "object", "required": ["embeddings", "dim", "model"], "properties": {
        "embeddings": {"type": "array", "items": {"type": "array", "items": {"type": "number"}}},
        "dim": {"type": "integer"}, "model": {"type": "string"}}},
    "ModelInfo": {"type": "object", "required": ["model", "classes", "embed_dim"], "properties": {
        "model": {"type": "string"}, "pretrained": {"type": ["string", "null"]}, "method": {"type": ["string", "null"]},
        "classes": {"type": "array", "items": {"type": "string"}}, "templates": {"type": "array", "items": {"type": "string"}},
        "embed_dim": {"type": "integer"}}, "additionalProperties": True},
}
RESULTS = {"classify": "Classification", "classify_batch": "BatchClassification", "embed_image": "ImageEmbedding",
           "embed_text": "TextEmbeddings"}


def _json(schema: dict, description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def document(service) -> dict:
    """BentoML's document for ``service`` (a ``bentoml.Service``), corrected as the module docstring says."""
    from orthserve import __version__

    doc = copy.deepcopy(service.openapi_spec.asdict())
    doc["info"] = {"title": TITLE, "version": __version__, "description": DESCRIPTION}
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    for name in ("InvalidArgument", "NotFound", "InternalServerError"):
        schemas.pop(name, None)
    schemas.update(copy.deepcopy(SCHEMAS))
    for path, item in doc["paths"].items():
        post = item.get("post")
        if not post or post.get("x-bentoml-name") not in RESULTS:
            continue
        name = post["x-bentoml-name"]
        body = post["requestBody"]["content"]
        media = next(iter(body))
        schema = body[media]["schema"]
        properties = schema.get("properties", {})
        if "labels" in properties:
            properties["labels"] = dict(LABELS)
            body[media].get("encoding", {}).pop("labels", None)
        if "top_k" in properties:
            properties["top_k"] = dict(TOP_K)
        post["requestBody"]["required"] = True
        for field, prop in properties.items():
            if prop.get("type") == "array" and prop.get("items", {}).get("format") == "binary":
                prop["minItems"] = 1  # images: at least one
        if name == "embed_text":
            schema["additionalProperties"] = False
            properties["texts"] = {"type": "array", "minItems": 1, "maxItems": 256,
                                   "items": {"type": "string", "minLength": 1, "maxLength": 300, "pattern": NON_BLANK}}
        post["responses"] = {
            "200": _json({"$ref": f"#/components/schemas/{RESULTS[name]}"}, "Success"),
            "400": _json(ERROR, "Bad input: an image that does not decode, a bad label list, top_k out of range, ..."),
            "413": _json(ERROR, "Request body above the limit (ORTHSERVE_MAX_BYTES)"),
            "415": _json(ERROR, f"Wrong content type: {media} expected"),
        }
    doc["paths"]["/model"] = {"get": {
        "summary": "What is loaded", "description": "The model, its classes and templates, runtimes and limits.",
        "operationId": "model_info", "tags": ["Service APIs"],
        "responses": {"200": _json({"$ref": "#/components/schemas/ModelInfo"}, "The loaded model"),
                      "503": _json(ERROR, "The model is not loaded yet")}}}
    return doc


def root_page() -> str:
    """Swagger UI (BentoML's bundled assets, without its tracking tag) under the project's title."""
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="UTF-8"><title>{html.escape(TITLE)}: image classification and embeddings</title>
<link rel="stylesheet" type="text/css" href="./static_content/swagger-ui.css" /></head>
<body><div id="swagger-ui"></div>
<script src="./static_content/swagger-ui-bundle.js" charset="UTF-8"></script>
<script>window.ui = SwaggerUIBundle({{url: "./docs.json", dom_id: "#swagger-ui", deepLinking: true}});</script>
</body></html>"""


class DocsPages:
    """ASGI middleware: ``GET /`` -> :func:`root_page`, ``GET /docs.json`` -> :func:`document` (built once)."""

    def __init__(self, app: Callable) -> None:
        self.app = app
        self._doc: bytes | None = None

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or scope["method"] not in ("GET", "HEAD") or path not in ("/", "/docs.json"):
            return await self.app(scope, receive, send)
        if path == "/":
            body, media = root_page().encode(), "text/html; charset=utf-8"
        else:
            if self._doc is None:
                from .service import Classifier

                self._doc = json.dumps(document(Classifier)).encode()
            body, media = self._doc, "application/json"
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", media.encode()), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else body})
