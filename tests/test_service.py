"""In-process tests of the service: every endpoint through the ASGI app, and every bad input -> 4xx JSON."""
from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import os
import time

import numpy as np
import pytest
from PIL import Image

from service_helpers import CLASSES, bomb, encode, export_tiny, odd_images, photos


LIMITS = {"ORTHSERVE_MAX_BYTES": str(2 * 1024 * 1024), "ORTHSERVE_MAX_LABELS": "10",
          "ORTHSERVE_MAX_IMAGES": "4", "ORTHSERVE_MAX_TEXTS": "8"}


@pytest.fixture(scope="module")
def artifact_dir(tmp_path_factory):
    return export_tiny(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def client(artifact_dir):
    from starlette.testclient import TestClient

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ORTHSERVE_MODEL", str(artifact_dir))
        mp.setenv("ORTHSERVE_LABEL_CACHE", "4")
        for key, value in LIMITS.items():
            mp.setenv(key, value)
        from service.service import Classifier

        with TestClient(Classifier.to_asgi(), raise_server_exceptions=False) as c:
            yield c


@pytest.fixture(scope="module")
def photo_bytes() -> bytes:
    return photos(1)[0].read_bytes()


def post_image(client, data: bytes, path: str = "/classify", **form):
    fields = {k: (json.dumps(v) if not isinstance(v, str) else v) for k, v in form.items()}
    return client.post(path, files={"image": ("upload.bin", data, "application/octet-stream")}, data=fields)


def assert_client_error(response, status: int, needle: str = "") -> None:
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    message = json.dumps(body)
    assert "error" in message, body
    assert needle.lower() in message.lower(), (needle, body)


def test_classify_own_classes(client, photo_bytes):
    r = post_image(client, photo_bytes)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "orthserve-tiny"
    preds = body["predictions"]
    assert sorted(p["label"] for p in preds) == sorted(CLASSES)
    scores = [p["score"] for p in preds]
    assert scores == sorted(scores, reverse=True) and abs(sum(scores) - 1) < 1e-6


def test_classify_zero_shot_labels_top_k_and_cache(client, photo_bytes):
    labels = ["ant", "bee", "dog", "cat"]
    before = client.get("/model").json()["label_cache"]
    r = post_image(client, photo_bytes, labels=labels, top_k=2)
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    assert len(preds) == 2 and {p["label"] for p in preds} <= set(labels)
    assert preds[0]["score"] >= preds[1]["score"]
    again = post_image(client, photo_bytes, labels=labels, top_k=2)
    assert again.json() == r.json()
    after = client.get("/model").json()["label_cache"]
    assert after["misses"] == before["misses"] + 1 and after["hits"] == before["hits"] + 1
    # default top_k with fewer labels than 5: all of them, softmax over exactly these labels
    few = post_image(client, photo_bytes, labels=["ant", "bee"]).json()["predictions"]
    assert len(few) == 2 and abs(sum(p["score"] for p in few) - 1) < 1e-6


def test_label_cache_is_bounded(client, photo_bytes):
    for i in range(7):
        assert post_image(client, photo_bytes, labels=[f"thing {i}", "other"]).status_code == 200
    cache = client.get("/model").json()["label_cache"]
    assert cache["size"] <= cache["max"] == 4


def test_classify_batch_matches_single(client):
    files = [p.read_bytes() for p in photos(3)]
    r = client.post("/classify_batch", files=[("images", (f"{i}.jpg", b, "image/jpeg")) for i, b in enumerate(files)],
                    data={"top_k": "1"})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert len(results) == 3 and all(len(res["predictions"]) == 1 for res in results)
    for data, res in zip(files, results):
        single = post_image(client, data, top_k=1).json()["predictions"][0]
        assert single["label"] == res["predictions"][0]["label"]
        assert single["score"] == pytest.approx(res["predictions"][0]["score"], abs=1e-5)


def test_embed_image_and_text(client, photo_bytes):
    r = post_image(client, photo_bytes, path="/embed_image")
    assert r.status_code == 200, r.text
    emb = np.asarray(r.json()["embedding"], dtype=np.float32)
    assert emb.shape == (r.json()["dim"],) and abs(np.linalg.norm(emb) - 1) < 1e-4
    t = client.post("/embed_text", json={"texts": ["a photo of ants.", "bees"]})
    assert t.status_code == 200, t.text
    texts = np.asarray(t.json()["embeddings"], dtype=np.float32)
    assert texts.shape == (2, emb.shape[0]) and np.allclose(np.linalg.norm(texts, axis=1), 1, atol=1e-4)


def test_model_health_and_metrics(client):
    info = client.get("/model").json()
    assert info["classes"] == CLASSES and info["method"] == "zeroshot" and info["model"] == "orthserve-tiny"
    assert "version" in info and info["embed_dim"] == 64
    assert client.get("/livez").status_code == 200
    assert client.get("/readyz").status_code == 200


@pytest.mark.parametrize("kind", ["grayscale", "rgba", "cmyk", "16bit", "palette", "exif_rotated", "animated",
                                  "webp", "tiny_1x1"])
def test_odd_but_valid_images_are_handled(client, kind):
    data = odd_images(photos(1)[0])[kind]
    r = post_image(client, data)
    assert r.status_code == 200, r.text
    assert len(r.json()["predictions"]) == 2


def test_exif_rotation_is_applied(client):
    data = odd_images(photos(1)[0])["exif_rotated"]
    upright = Image.open(io.BytesIO(data)).convert("RGB").transpose(Image.Transpose.ROTATE_270)
    unrotated = Image.open(io.BytesIO(data)).convert("RGB")
    got = post_image(client, data, path="/embed_image").json()["embedding"]
    want = post_image(client, encode(upright, "PNG"), path="/embed_image").json()["embedding"]
    wrong = post_image(client, encode(unrotated, "PNG"), path="/embed_image").json()["embedding"]
    assert np.allclose(got, want, atol=1e-5) and not np.allclose(got, wrong, atol=1e-3)


BAD_IMAGES = {
    "not_an_image": (b"hello, this is text, not a picture" * 10, "not a readable image"),
    "zero_bytes": (b"", "empty"),
    "bomb": (None, "limit"),
}


@pytest.mark.parametrize("case", sorted(BAD_IMAGES))
@pytest.mark.parametrize("path", ["/classify", "/embed_image"])
def test_bad_images(client, case, path):
    data, needle = BAD_IMAGES[case]
    assert_client_error(post_image(client, bomb() if data is None else data, path=path), 400, needle)


def test_truncated_image(client, photo_bytes):
    assert_client_error(post_image(client, photo_bytes[: len(photo_bytes) // 2]), 400, "image")


@pytest.mark.parametrize("labels,needle", [
    ([], "empty list"),
    (["cat", "cat"], "duplicate"),
    ([f"label {i}" for i in range(11)], "too many"),
    (["cat", ""], "empty"),
    (["cat", "   "], "empty"),
    (["cat", "x" * 301], "characters long"),
    ([1, 2], "JSON list"),
    ("cat, cat", "duplicate"),
    (" , ,", "empty list"),
])
def test_bad_labels(client, photo_bytes, labels, needle):
    assert_client_error(post_image(client, photo_bytes, labels=labels), 400, needle)


@pytest.mark.parametrize("top_k,needle", [(0, "at least 1"), (-3, "at least 1"), ("many", "integer"), (2.5, "integer")])
def test_bad_top_k(client, photo_bytes, top_k, needle):
    assert_client_error(post_image(client, photo_bytes, top_k=top_k), 400, needle)


def test_top_k_above_the_number_of_labels_returns_them_all(client, photo_bytes):
    r = post_image(client, photo_bytes, labels=["a", "b", "c"], top_k=4)
    assert r.status_code == 200 and len(r.json()["predictions"]) == 3


@pytest.mark.parametrize("labels", ['["ant", "bee"]', "ant, bee", "ant,bee,", ' ["ant" , "bee"] '])
def test_labels_as_a_json_list_or_comma_separated(client, photo_bytes, labels):
    """The same forms as `python -m export --labels` (orthserve.classnames.parse_labels)."""
    r = post_image(client, photo_bytes, labels=labels)
    assert r.status_code == 200, r.text
    assert sorted(p["label"] for p in r.json()["predictions"]) == ["ant", "bee"]


def test_a_label_that_json_reads_as_a_number_stays_a_label(client, photo_bytes):
    r = post_image(client, photo_bytes, labels="0")  # BentoML decodes the field to the number 0
    assert r.status_code == 200 and r.json()["predictions"][0]["label"] == "0"


def test_oversized_upload_is_413(client):
    big = os.urandom(3 * 1024 * 1024)
    assert_client_error(post_image(client, big), 413, "limit")

    def chunks():  # no Content-Length: chunked transfer, counted while streaming
        for _ in range(3):
            yield os.urandom(1024 * 1024)

    r = client.post("/classify", content=chunks(), headers={"content-type": "multipart/form-data; boundary=xyz"})
    assert_client_error(r, 413, "limit")


def test_missing_fields_and_wrong_content_types(client, photo_bytes):
    assert_client_error(client.post("/classify", files={"picture": ("a.jpg", photo_bytes, "image/jpeg")}), 400, "missing")
    assert_client_error(client.post("/classify", data={"image": "http://127.0.0.1:1/x.jpg"},
                                    files={"other": ("a", b"x")}), 400, "file upload")
    assert_client_error(client.post("/classify", json={"image": "/etc/passwd"}), 415, "multipart")
    assert_client_error(client.post("/classify", content=photo_bytes, headers={"content-type": "image/jpeg"}), 415)
    assert_client_error(client.post("/classify", content=b"--x\r\ngarbage",
                                    headers={"content-type": "multipart/form-data; boundary=x"}), 400)
    assert_client_error(client.post("/embed_text", data={"texts": "a"}), 415, "application/json")
    assert_client_error(client.post("/embed_text", content=b"{not json", headers={"content-type": "application/json"}),
                        400, "not valid JSON")
    assert_client_error(client.post("/embed_text", json={}), 400, "texts")
    assert_client_error(client.post("/embed_text", json={"texts": "just a string"}), 400, "texts")
    assert_client_error(client.post("/embed_text", json={"texts": [1, None]}), 400, "texts")
    assert_client_error(client.post("/embed_text", json={"texts": []}), 400, "empty")
    assert_client_error(client.post("/embed_text", json={"texts": ["t"] * 9}), 400, "too many")
    assert_client_error(client.post("/embed_text", json={"texts": ["x" * 1000]}), 400, "characters long")
    assert client.get("/classify").status_code == 405
    # BentoML's pickle serde (its inter-service format) is never unpickled from a public request
    import pickle
    for path in ("/classify", "/embed_text"):
        assert_client_error(client.post(path, content=pickle.dumps({"texts": ["a"]}),
                                        headers={"content-type": "application/vnd.bentoml+pickle"}), 415, "pickle")


def test_classify_batch_bad_inputs(client, photo_bytes):
    many = [("images", (f"{i}.jpg", photo_bytes, "image/jpeg")) for i in range(5)]
    assert_client_error(client.post("/classify_batch", files=many), 400, "too many images")
    mixed = [("images", ("a.jpg", photo_bytes, "image/jpeg")), ("images", ("b.jpg", b"nope", "image/jpeg"))]
    assert_client_error(client.post("/classify_batch", files=mixed), 400, "images[1]")
    assert_client_error(client.post("/classify_batch", files={"image": ("a.jpg", photo_bytes, "image/jpeg")}),
                        400, "missing")


def test_still_healthy_after_bad_input(client, photo_bytes):
    for data in (b"", b"junk", bomb()):
        post_image(client, data)
    assert client.get("/readyz").status_code == 200
    assert post_image(client, photo_bytes).status_code == 200


def test_direct_method_calls_without_server(artifact_dir, tmp_path, monkeypatch):
    """The class methods work when called directly (no HTTP): errors come back as 4xx responses."""
    monkeypatch.setenv("ORTHSERVE_MODEL", str(artifact_dir))
    from service.service import Classifier

    svc = Classifier()
    image = tmp_path / "photo.jpg"
    image.write_bytes(photos(1)[0].read_bytes())
    out = asyncio.run(svc.classify(image, labels=None, top_k=None))
    assert [p["label"] for p in out["predictions"]] and out["model"] == "orthserve-tiny"
    bad = asyncio.run(svc.classify(image, labels=["a", "a"], top_k=None))
    assert bad.status_code == 400
    svc.artifact = dataclasses.replace(svc.artifact, class_embeddings=None)  # a model without classes
    none = asyncio.run(svc.classify(image, labels=None, top_k=None))
    assert none.status_code == 400 and b"pass 'labels'" in none.body


def test_provider_and_variant_choice(artifact_dir, monkeypatch):
    from orthserve.artifact import load_artifact
    from service.runtime import OnnxEncoder, choose_providers, choose_variant

    monkeypatch.delenv("ORTHSERVE_PROVIDERS", raising=False)
    assert choose_providers()[-1] == "CPUExecutionProvider"  # no GPU here: CPU only; with one, TRT/CUDA first
    assert choose_providers("cpu") == ["CPUExecutionProvider"]
    with pytest.raises(ValueError, match="ORTHSERVE_PROVIDERS"):
        choose_providers("NoSuchExecutionProvider")
    art = load_artifact(artifact_dir)
    monkeypatch.setenv("ORTHSERVE_INT8", "1")  # the int8 image tower; text stays fp32 (cached, most sensitive)
    assert choose_variant(art, "image", on_gpu=False) == "int8"
    assert choose_variant(art, "text", on_gpu=False) == "fp32"
    monkeypatch.setenv("ORTHSERVE_VARIANT", "int8")  # explicit: both towers
    assert choose_variant(art, "text", on_gpu=False) == ("int8" if "int8" in art.variants("text") else "fp32")
    monkeypatch.setenv("ORTHSERVE_VARIANT", "bogus")
    with pytest.raises(ValueError, match="ORTHSERVE_VARIANT"):
        choose_variant(art, "image", on_gpu=False)
    monkeypatch.setenv("ORTHSERVE_VARIANT", "auto")
    monkeypatch.setenv("ORTHSERVE_THREADS", "1")
    encoder = OnnxEncoder(art, "image", providers=["CPUExecutionProvider"])
    assert encoder.providers == ["CPUExecutionProvider"] and encoder.variant in ("fp32", "int8")
    # the service's sessions leave the cores to the API worker between runs (no busy-waiting threads)
    assert encoder.session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning") == "0"


@pytest.mark.parametrize("variant", ["fp16", "int8"])
def test_every_variant_runs_on_cpu_and_agrees_with_fp32(artifact_dir, monkeypatch, variant):
    """fp16 on CPU used to crash onnxruntime 1.31 (NchwcTransformer); ort_session disables it."""
    from orthserve.artifact import load_artifact
    from orthserve.preprocess import load_pixels
    from service.runtime import OnnxEncoder

    art = load_artifact(artifact_dir)
    pixels = load_pixels([str(p) for p in photos(4)], art.preprocess)
    monkeypatch.setenv("ORTHSERVE_VARIANT", "fp32")
    reference = OnnxEncoder(art, "image", providers=["CPUExecutionProvider"])(pixels)
    monkeypatch.setenv("ORTHSERVE_VARIANT", variant)
    encoder = OnnxEncoder(art, "image", providers=["CPUExecutionProvider"])
    assert encoder.variant == variant
    cosine = (encoder(pixels) * reference).sum(-1)
    assert cosine.min() > 0.99


def test_bad_model_location_is_a_clear_error(tmp_path):
    from service.runtime import open_artifact

    with pytest.raises((FileNotFoundError, ValueError), match="ORTHSERVE_MODEL|artifact"):
        open_artifact(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="manifest"):
        open_artifact(str(tmp_path / "empty"))


# Regressions found by bench/bad_inputs.py

def test_json_nested_too_deep_is_a_400_not_a_500(client):
    """Found by bench/bad_inputs.py: RequestGuard's json.loads raised RecursionError (not a ValueError) -> 500."""
    deep = b"[" * 100_000 + b"]" * 100_000
    r = client.post("/embed_text", content=b'{"texts": ' + deep + b"}", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "nested too deeply" in r.json()["error"], r.text
    image = photos(1)[0].read_bytes()
    r = client.post("/classify", files={"image": ("a.jpg", image, "image/jpeg")}, data={"labels": deep.decode()})
    assert r.status_code == 400 and "JSON list of strings" in r.json()["error"], r.text
    assert client.get("/readyz").status_code == 200


def test_extreme_aspect_ratio_is_refused_before_resizing(client):
    """Found by bench/bad_inputs.py: 1x60000 passes the decoded-pixel limit, but resizing its shorter side to the
    model's size first would allocate image_size x image_size*60000 pixels (minutes of CPU, GBs of memory)."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (1, 60000)).save(buf, "PNG")
    start = time.monotonic()
    r = client.post("/classify", files={"image": ("tall.png", buf.getvalue(), "image/png")})
    assert r.status_code == 400 and "too elongated" in r.json()["error"], r.text
    assert time.monotonic() - start < 10


def test_batcher_merges_waiting_requests_in_order():
    """Requests that arrive while a batch runs go together next; each gets its own rows back, in order."""
    from service.batching import Batcher

    calls: list[int] = []

    def encode(batch: np.ndarray) -> np.ndarray:
        calls.append(len(batch))
        time.sleep(0.05)
        return batch * 2

    async def main():
        batcher = Batcher(encode, max_batch=8)
        inputs = [np.full((n, 3), i, np.float32) for i, n in enumerate([1, 1, 2, 1, 3, 1, 9])]
        outputs = await asyncio.gather(*(batcher(x) for x in inputs))
        for x, y in zip(inputs, outputs):
            assert y.shape == x.shape and (y == 2 * x).all()
        return await batcher(np.ones((1, 3), np.float32))  # alone later: runs at once, batch of 1

    assert (asyncio.run(main()) == 2).all()
    # all seven are queued before the model starts: the first five fill 8 rows, then 1, then the 9-row one alone
    assert calls == [8, 1, 9, 1]


def test_batcher_errors_reach_every_request_of_the_batch_and_cancelled_ones_are_skipped():
    from service.batching import Batcher

    seen: list[int] = []

    def encode(batch: np.ndarray) -> np.ndarray:
        seen.append(len(batch))
        time.sleep(0.02)
        if (batch < 0).any():
            raise ValueError("bad rows")
        return batch

    async def main():
        batcher = Batcher(encode, max_batch=32)
        first = asyncio.ensure_future(batcher(np.zeros((1, 2), np.float32)))
        await asyncio.sleep(0)  # first is running now
        doomed = asyncio.ensure_future(batcher(np.zeros((5, 2), np.float32)))
        good, bad = batcher(np.zeros((1, 2), np.float32)), batcher(-np.ones((1, 2), np.float32))
        await asyncio.sleep(0)
        doomed.cancel()  # e.g. the client went away while waiting
        results = await asyncio.gather(first, good, bad, return_exceptions=True)
        assert isinstance(results[2], ValueError) and isinstance(results[1], ValueError)  # same batch, same error
        assert (await batcher(np.ones((1, 2), np.float32)) == 1).all()  # and the batcher still works after

    asyncio.run(main())
    assert seen == [1, 2, 1]  # the cancelled 5 rows never reached the model


def test_the_service_balances_connections_over_its_workers(client):
    """service/balance.py is installed; run in one process (no BentoML worker index) it has nothing to balance."""
    from service.balance import ConnectionBalancer
    from service.service import WORKERS, Classifier

    assert (ConnectionBalancer, {"workers": WORKERS}) in Classifier.middlewares
    assert all(client.get("/livez").headers.get("connection") != "close" for _ in range(10))


def test_the_busier_worker_asks_its_client_to_reconnect(tmp_path):
    """Two workers' balancers on one board: a worker 2 or more requests ahead of the other answers
    Connection: close; a balanced pair never does; a request counts as in flight until its response is sent."""
    from starlette.responses import PlainTextResponse
    from starlette.testclient import TestClient

    from service.balance import ConnectionBalancer, InFlightBoard

    seen_in_flight = []

    async def app(scope, receive, send):
        seen_in_flight.append(first.slots.tolist())
        await PlainTextResponse("ok")(scope, receive, send)

    first, second = (InFlightBoard(tmp_path / "board", 2, index) for index in (0, 1))
    worker = TestClient(ConnectionBalancer(app, workers=2, board=first))
    assert worker.get("/").headers.get("connection") is None  # 1 in flight here, 0 there: moving gains nothing
    assert seen_in_flight == [[1, 0]] and first.slots.tolist() == [0, 0]

    first.slots[0] = 2  # two more requests of this worker's other clients are in flight
    assert worker.get("/").headers.get("connection") == "close"  # 3 against 0
    second.slots[1] = 2
    assert worker.get("/").headers.get("connection") is None  # 3 against 2
    assert first.slots.tolist() == [2, 2]


def test_a_board_is_shared_by_one_servers_workers_and_cleared_after_it(tmp_path, monkeypatch):
    from bentoml._internal.context import server_context

    from service.balance import BOARD_PREFIX, InFlightBoard

    assert InFlightBoard.for_this_server(2, tmp_path) is None  # not a BentoML worker
    monkeypatch.setattr(server_context, "worker_index", 2)
    assert InFlightBoard.for_this_server(1, tmp_path) is None  # one worker: nothing to balance
    dead = subprocess_pid_that_has_exited()
    (tmp_path / f"{BOARD_PREFIX}{dead}-2").write_bytes(bytes(8))
    board = InFlightBoard.for_this_server(2, tmp_path)
    assert board is not None and board.mine == 1
    assert [p.name for p in tmp_path.iterdir()] == [f"{BOARD_PREFIX}{os.getppid()}-2"]
    with pytest.raises(ValueError, match="outside"):
        InFlightBoard(tmp_path / "board", 2, 2)


def subprocess_pid_that_has_exited() -> int:
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_fresh_clone_without_a_model_says_which_command_makes_one(tmp_path, monkeypatch):
    """No ORTHSERVE_MODEL, no artifacts/default, nothing in the BentoML store: the error names `make artifact`."""
    from service import runtime

    monkeypatch.delenv("ORTHSERVE_MODEL", raising=False)
    monkeypatch.setenv("BENTOML_HOME", str(tmp_path / "bentoml"))
    monkeypatch.setattr(runtime, "DEFAULT_ARTIFACT", tmp_path / "artifacts" / "default")
    with pytest.raises(FileNotFoundError, match="make artifact") as raised:
        runtime.resolve_model()
    assert "ORTHSERVE_MODEL=DIR" in str(raised.value)


@pytest.mark.parametrize("graphs", [False, True])
def test_bound_runner_matches_session_run(artifact_dir, graphs):
    """The GPU path's IO binding (service/gpu.py), run on the CPU provider: same embeddings as session.run for
    batches below, at and above the largest batch, from the staging buffer or not; with buckets, padded rows
    are dropped.  (Pinning and CUDA graphs themselves need a GPU: bench/gpu_check.sh.)"""
    from orthserve.artifact import load_artifact, ort_session
    from orthserve.preprocess import load_pixels
    from service.gpu import BoundRunner, buckets

    art = load_artifact(artifact_dir)
    session = ort_session(art.onnx_path("image"), providers=["CPUExecutionProvider"], threads=1)
    runner = BoundRunner(session, max_batch=4, device="cpu", graphs=graphs)
    assert buckets(4) == [1, 2, 4] and buckets(6) == [1, 2, 4, 6]
    assert sorted(runner.graphs) == ([1, 2, 4] if graphs else []) and runner.pinned is False  # no CUDA here
    pixels = np.concatenate([load_pixels([str(p) for p in photos(4)], art.preprocess)] * 2)[:7]
    for rows in (1, 3, 4, 7):
        expected = session.run(None, {"pixels": pixels[:rows]})[0]
        np.testing.assert_allclose(runner(pixels[:rows]), expected, atol=1e-6)
    staged = runner.staging[:2]
    np.copyto(staged, pixels[2:4])  # assembled in place, as the batcher does on a GPU
    np.testing.assert_allclose(runner(staged), session.run(None, {"pixels": pixels[2:4]})[0], atol=1e-6)


def test_batcher_assembles_batches_in_the_staging_buffer():
    from service.batching import Batcher

    buffer = np.zeros((8, 2), np.float32)
    seen: list[bool] = []

    def encode(batch: np.ndarray) -> np.ndarray:
        seen.append(np.shares_memory(batch, buffer))
        time.sleep(0.02)
        return batch.copy()

    async def main():
        batcher = Batcher(encode, max_batch=8, staging=lambda rows: buffer[:rows])
        inputs = [np.full((n, 2), i, np.float32) for i, n in enumerate([1, 2, 3])]
        outputs = await asyncio.gather(*(batcher(x) for x in inputs))
        assert all((y == x).all() for x, y in zip(inputs, outputs))

    asyncio.run(main())
    assert seen == [True]  # all three were queued before the model ran: merged in the buffer, no second copy


def test_the_service_imports_and_tokenizes_without_torch(artifact_dir):
    """The Bento carries no torch, open_clip or transformers (bentofile.yaml): the service must not need them."""
    import subprocess
    import sys

    code = ("import sys; import service.service as s; ids = s.artifact().tokenize(['a photo of a bee.', '']); "
            "assert ids.shape == (2, s.artifact().context_length), ids.shape; "
            "print(sorted(m for m in ('torch', 'open_clip', 'transformers') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "ORTHSERVE_MODEL": str(artifact_dir)})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_an_artifact_from_an_older_orthserve_is_refused_with_the_fix(artifact_dir, tmp_path):
    import shutil

    from orthserve.artifact import ArtifactError, load_artifact

    old = tmp_path / "old"
    shutil.copytree(artifact_dir, old)
    manifest = json.loads((old / "manifest.json").read_text())
    (old / "manifest.json").write_text(json.dumps({**manifest, "schema_version": 1}))
    with pytest.raises(ArtifactError, match=r"schema_version 1.*Re-export.*python -m export"):
        load_artifact(old)
    del manifest["files"]["tokenizer.json"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=r"no tokenizer.json.*Re-export"):
        load_artifact(old)


def test_the_request_guard_covers_every_api_route(artifact_dir, monkeypatch):
    """The guard's table is read from the service's own APIs: a new endpoint cannot miss its limits."""
    monkeypatch.setenv("ORTHSERVE_MODEL", str(artifact_dir))
    from service.service import Classifier, guarded_routes

    routes = guarded_routes(Classifier)
    assert routes == {"/classify": "image", "/classify_batch": "images", "/embed_image": "image", "/embed_text": None}
    assert set(routes) == {api.route for api in Classifier.apis.values()}


def test_startup_hashes_the_served_files_once_per_server(artifact_dir, tmp_path, monkeypatch):
    """The server process hashes what the service reads (chosen variants, tokenizer, classes); its workers, which
    inherit the environment, only check sizes; a same-size change to a served file is still refused."""
    import shutil

    from orthserve.artifact import ArtifactError
    from service import runtime, settings

    monkeypatch.delenv("ORTHSERVE_VARIANT", raising=False)
    monkeypatch.delenv("ORTHSERVE_INT8", raising=False)
    monkeypatch.delenv(settings.VERIFIED, raising=False)
    copy = tmp_path / "art"
    shutil.copytree(artifact_dir, copy)

    def flip_a_byte(name: str) -> None:
        data = bytearray((copy / name).read_bytes())
        data[len(data) // 2] ^= 0xFF
        (copy / name).write_bytes(bytes(data))

    flip_a_byte("image.int8.onnx")  # a variant the CPU service does not run by default
    from orthserve import artifact as artifact_module

    hashed = []
    real = artifact_module.sha256_file
    monkeypatch.setattr(artifact_module, "sha256_file", lambda p, *a: hashed.append(p.name) or real(p, *a))
    first = runtime.open_artifact(str(copy))
    assert first.manifest["model"] == "orthserve-tiny"
    assert set(hashed) == {"image.onnx", "text.onnx", "tokenizer.json", "classifier.safetensors"}
    assert settings.verified_artifact().startswith(str(copy.resolve()))
    hashed.clear()
    again = runtime.open_artifact(str(copy))  # a worker: the server process checked this manifest already
    assert again.manifest == first.manifest and hashed == []
    flip_a_byte("image.onnx")
    monkeypatch.delenv(settings.VERIFIED)  # a new server
    with pytest.raises(ArtifactError, match="image.onnx does not match its sha256"):
        runtime.open_artifact(str(copy))
