"""Integration: `bentoml serve` as a subprocess on a loopback port, real multipart requests with real photos,
results equal to direct onnxruntime inference on the artifact's image.onnx / text.onnx."""
from __future__ import annotations

import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest

from orthserve.artifact import load_artifact
from orthserve.preprocess import decode_image, to_pixels
from service_helpers import export_tiny, live_server, photos

pytestmark = pytest.mark.slow
MAX_BYTES = 2 * 1024 * 1024


@pytest.fixture(scope="module")
def artifact_dir(tmp_path_factory) -> Path:
    return export_tiny(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def server(artifact_dir, tmp_path_factory):
    with live_server(artifact_dir, tmp_path_factory.mktemp("serve"), ORTHSERVE_MAX_BYTES=str(MAX_BYTES)) as client:
        yield client


@pytest.fixture(scope="module")
def direct(artifact_dir):
    """Reference inference: onnxruntime on the artifact, orthserve.preprocess, no service code."""
    art = load_artifact(artifact_dir)
    image = ort.InferenceSession(str(art.onnx_path("image")), providers=["CPUExecutionProvider"])
    text = ort.InferenceSession(str(art.onnx_path("text")), providers=["CPUExecutionProvider"])

    def embed_images(datas: list[bytes]) -> np.ndarray:
        pixels = np.stack([to_pixels(decode_image(d), art.preprocess) for d in datas])
        return image.run(None, {"pixels": pixels})[0]

    def embed_texts(texts: list[str]) -> np.ndarray:
        return text.run(None, {"tokens": art.tokenize(texts)})[0]

    def zero_shot(labels: list[str]) -> np.ndarray:
        emb = embed_texts([t.replace("{}", l) for l in labels for t in art.templates])
        emb = emb.reshape(len(labels), len(art.templates), -1).mean(axis=1)
        return emb / np.linalg.norm(emb, axis=1, keepdims=True)

    def probs(img_emb: np.ndarray, class_emb: np.ndarray) -> np.ndarray:
        logits = art.logit_scale * img_emb.astype(np.float64) @ class_emb.astype(np.float64).T
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    return art, embed_images, embed_texts, zero_shot, probs


def classify(client: httpx.Client, data: bytes, **form) -> httpx.Response:
    return client.post("/classify", files={"image": ("photo.jpg", data, "image/jpeg")},
                       data={k: json.dumps(v) for k, v in form.items()})


def check_predictions(preds: list[dict], names: list[str], p: np.ndarray) -> None:
    order = np.argsort(-p, kind="stable")
    assert [d["label"] for d in preds] == [names[i] for i in order[: len(preds)]]
    assert np.allclose([d["score"] for d in preds], p[order[: len(preds)]], atol=1e-5)


def test_classify_equals_direct_onnxruntime(server, direct):
    art, embed_images, _, zero_shot, probs = direct
    datas = [p.read_bytes() for p in photos(6)]
    p_own = probs(embed_images(datas), art.class_embeddings)
    labels = ["ant", "bee", "flower", "insect on a leaf"]
    p_zero = probs(embed_images(datas), zero_shot(labels))
    for i, data in enumerate(datas):
        r = classify(server, data)
        assert r.status_code == 200, r.text
        check_predictions(r.json()["predictions"], art.classnames, p_own[i])
        z = classify(server, data, labels=labels, top_k=3)
        assert z.status_code == 200, z.text
        check_predictions(z.json()["predictions"], labels, p_zero[i])


def test_batch_and_embeddings_equal_direct(server, direct):
    art, embed_images, embed_texts, _, probs = direct
    datas = [p.read_bytes() for p in photos(3)]
    r = server.post("/classify_batch", files=[("images", (f"{i}.jpg", d, "image/jpeg")) for i, d in enumerate(datas)])
    assert r.status_code == 200, r.text
    p = probs(embed_images(datas), art.class_embeddings)
    for res, row in zip(r.json()["results"], p):
        check_predictions(res["predictions"], art.classnames, row)
    e = server.post("/embed_image", files={"image": ("a.jpg", datas[0], "image/jpeg")})
    assert np.allclose(e.json()["embedding"], embed_images(datas[:1])[0], atol=1e-5)
    t = server.post("/embed_text", json={"texts": ["ants", "a bee on a flower"]})
    assert np.allclose(t.json()["embeddings"], embed_texts(["ants", "a bee on a flower"]), atol=1e-5)


def encode_batch_stats(server) -> tuple[float, float]:
    """(calls, images) of the batched image encoder so far, from the Prometheus metrics."""
    metrics = server.get("/metrics").text
    count = sum(float(v) for v in re.findall(r'^orthserve_image_batch_size_count(?:\{[^}]*\})? (\S+)', metrics, re.M))
    total = sum(float(v) for v in re.findall(r'^orthserve_image_batch_size_sum(?:\{[^}]*\})? (\S+)', metrics, re.M))
    return count, total


def test_concurrent_requests_share_batches(server, direct):
    """Bursts of 48 requests from 16 threads: every answer right, and the encoder sees batches > 1.
    Requests only share a batch when they wait while another runs; with a fast tiny model one burst may go
    one by one, so up to three bursts are sent; batching must show in at least one of them."""
    art, embed_images, _, _, probs = direct
    datas = [p.read_bytes() for p in photos(8)]
    p = probs(embed_images(datas), art.class_embeddings)
    means = []
    for _ in range(3):
        calls_before, images_before = encode_batch_stats(server)
        with ThreadPoolExecutor(16) as pool:
            responses = list(pool.map(lambda i: classify(server, datas[i % len(datas)]), range(48)))
        for i, r in enumerate(responses):
            assert r.status_code == 200, r.text
            check_predictions(r.json()["predictions"], art.classnames, p[i % len(datas)])
        calls, images = encode_batch_stats(server)
        assert calls > calls_before and images - images_before >= 48
        means.append((images - images_before) / (calls - calls_before))
        if means[-1] > 1.0:
            break
    assert max(means) > 1.0, f"mean batch sizes {means}: concurrent requests were not batched"


def test_bad_input_over_http_and_still_ready(server):
    r = classify(server, b"definitely not an image")
    assert r.status_code == 400 and "error" in r.json()
    assert server.post("/classify", json={"image": "x"}).status_code == 415
    big = server.post("/classify", files={"image": ("big.jpg", os.urandom(MAX_BYTES + 1024), "image/jpeg")})
    assert big.status_code == 413 and "limit" in big.json()["error"]
    assert server.get("/readyz").status_code == 200 and server.get("/livez").status_code == 200
    info = server.get("/model").json()
    assert info["model"] == "orthserve-tiny" and info["classes"] == ["ants", "bees"]


def test_an_oversized_upload_gets_a_413_that_urllib_can_read(server):
    """Python's urllib sends the whole body before reading the answer: a server that answers 413 and closes
    at once breaks its pipe. Bodies up to 8x the limit are drained (read and dropped, never kept), so the
    client reads the 413 JSON."""
    import urllib.error
    import urllib.request

    boundary = "orthserveboundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"big.jpg\"\r\n"
            "Content-Type: image/jpeg\r\n\r\n").encode() + os.urandom(6 * MAX_BYTES) + f"\r\n--{boundary}--\r\n".encode()
    request = urllib.request.Request(f"{server.base_url}/classify", data=body, method="POST",
                                      headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    with pytest.raises(urllib.error.HTTPError) as answer:
        urllib.request.urlopen(request, timeout=60)
    assert answer.value.code == 413 and "limit" in json.loads(answer.value.read())["error"]
    assert server.get("/readyz").status_code == 200


def test_both_workers_count_requests_in_flight_on_one_board(server):
    """service/balance.py in real worker processes: one board for the server's 2 workers (named after their
    parent, `bentoml serve`), and once every answer is in, no request is left counted in flight."""
    from service.balance import BOARD_PREFIX, board_folder

    with ThreadPoolExecutor(16) as pool:
        statuses = list(pool.map(lambda _: server.get("/livez").status_code, range(64)))
    assert statuses == [200] * 64
    boards = list(board_folder().glob(f"{BOARD_PREFIX}{server.server_pid}-*"))
    assert [b.name for b in boards] == [f"{BOARD_PREFIX}{server.server_pid}-2"]
    assert np.fromfile(boards[0], dtype=np.int32).tolist() == [0, 0]


# --------------------------------------------------------------------------- OpenAPI conformance (schemathesis)

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402
from hypothesis import strategies as hs  # noqa: E402


def _png(size: tuple[int, int], color: tuple[int, int, int]) -> bytes:
    from PIL import Image

    from service_helpers import encode

    return encode(Image.new("RGB", size, color), "PNG")


# uploads the document calls `format: binary` are images: random bytes would only exercise the 400 path
schemathesis.openapi.format("binary", hs.builds(_png, hs.tuples(hs.integers(1, 96), hs.integers(1, 96)),
                                                 hs.tuples(*[hs.integers(0, 255)] * 3)))


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_openapi_document_describes_what_the_service_does(server, mode):
    """Every operation of /docs.json with generated requests (schemathesis; valid ones, then invalid ones):
    no server error, status codes, content types and bodies as documented, schema-valid requests accepted
    and invalid ones refused. A bounded number of examples per operation keeps it to about a minute."""
    from hypothesis import given

    schema = schemathesis.openapi.from_url(f"{server.base_url}/docs.json")
    failures = {}
    for result in schema.get_all_operations():
        operation = result.ok()
        if mode == "negative" and operation.method.upper() == "GET":
            continue  # no input to get wrong

        @given(case=operation.as_strategy(generation_mode=schemathesis.GenerationMode(mode)))
        @settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck), database=None,
                  derandomize=True)  # the same requests every run
        def check(case):
            # a multipart text field is text on the wire: "-38" is a valid label, though schemathesis counts it
            # as a number sent where the document says string; JSON bodies keep the check
            multipart = case.media_type == "multipart/form-data"
            excluded = [schemathesis.checks.negative_data_rejection] if multipart else []
            case.call_and_validate(base_url=str(server.base_url), excluded_checks=excluded)

        try:
            check()
        except Exception as err:  # schemathesis raises a failure group per operation
            failures[operation.label] = str(err)[:1500]
    assert not failures, failures


def test_root_page_and_document_carry_the_project(server):
    page = server.get("/")
    assert page.status_code == 200 and "<title>orthserve" in page.text and "googletagmanager" not in page.text
    doc = server.get("/docs.json").json()
    assert doc["info"]["title"] == "orthserve" and "curl -F image=@photo.jpg" in doc["info"]["description"]
    assert "get" in doc["paths"]["/model"]
    labels = doc["paths"]["/classify"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]["properties"]["labels"]
    assert labels["type"] == "string" and "commas" in labels["description"]


def test_labels_in_either_form_and_our_own_json_errors(server):
    photo = photos(1)[0].read_bytes()
    as_json = classify(server, photo, labels=["ant", "bee"]).json()
    as_commas = server.post("/classify", files={"image": ("p.jpg", photo, "image/jpeg")}, data={"labels": "ant, bee"}).json()
    assert as_json == as_commas and [p["label"] for p in as_json["predictions"]] in (["ant", "bee"], ["bee", "ant"])
    wrong_key = server.post("/embed_text", json={"text": ["a dog"]})
    assert wrong_key.status_code == 400 and "unknown field(s) ['text']" in wrong_key.json()["error"]
    assert set(wrong_key.json()) == {"error"}  # no pydantic error list, no link to pydantic's site
