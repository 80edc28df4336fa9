"""Load test: N concurrent clients for T seconds against a running service on loopback.

    .venv/bin/python bench/load.py --url http://127.0.0.1:3000 --concurrency 8 --seconds 20

Each client posts real photos to /classify in a loop until the time is up (bounded: it stops by itself).
Records errors, throughput, p50/p99 latency and the mean adaptive batch size of the image encoder
(from the server's /metrics, before/after difference) in bench/results/load_c{N}_{time}.json and .md.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import platform
import re
import time
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
PHOTOS = REPO.parent / "shared" / "data" / "hymenoptera-val"
BATCH_RE = r'bentoml_service_adaptive_batch_size_{}\{{[^}}]*method_name="encode"[^}}]*\}} (\S+)'


async def batch_counters(client: httpx.AsyncClient) -> tuple[float, float]:
    """(sum, count) of the encoder's adaptive batch size histogram, all workers."""
    text = (await client.get("/metrics")).text
    return tuple(sum(float(v) for v in re.findall(BATCH_RE.format(k), text)) for k in ("sum", "count"))  # type: ignore


async def worker(client: httpx.AsyncClient, images: list[bytes], deadline: float, offset: int,
                 latencies: list[float], errors: list[str], labels: str | None) -> None:
    i = offset
    while time.monotonic() < deadline:
        data = images[i % len(images)]
        i += 1
        form = {"labels": labels} if labels else {}
        start = time.perf_counter()
        try:
            r = await client.post("/classify", files={"image": ("photo.jpg", data, "image/jpeg")}, data=form)
            if r.status_code == 200:
                latencies.append(time.perf_counter() - start)
            else:
                errors.append(f"{r.status_code}: {r.text[:200]}")
        except httpx.HTTPError as err:
            errors.append(f"{type(err).__name__}: {err}")


async def run(url: str, concurrency: int, seconds: float, n_images: int, labels: str | None) -> dict:
    images = [p.read_bytes() for p in sorted(PHOTOS.glob("*/*.jpg"))[:n_images]]
    if not images:
        raise SystemExit(f"no photos under {PHOTOS}")
    limits = httpx.Limits(max_connections=concurrency + 2)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        if (await client.get("/readyz")).status_code != 200:
            raise SystemExit(f"{url} is not ready")
        model = (await client.get("/model")).json()
        for data in images[:4]:  # warm the connection pool and the server
            await client.post("/classify", files={"image": ("w.jpg", data, "image/jpeg")})
        sum0, count0 = await batch_counters(client)
        latencies: list[float] = []
        errors: list[str] = []
        start = time.monotonic()
        await asyncio.gather(*(worker(client, images, start + seconds, k * 7, latencies, errors, labels)
                               for k in range(concurrency)))
        elapsed = time.monotonic() - start
        sum1, count1 = await batch_counters(client)
    lat_ms = np.asarray(latencies) * 1000 if latencies else np.asarray([np.nan])
    batches = count1 - count0
    return {
        "url": url, "endpoint": "/classify", "labels": labels, "concurrency": concurrency, "seconds": round(elapsed, 2),
        "requests_ok": len(latencies), "errors": len(errors), "error_samples": sorted(set(errors))[:5],
        "throughput_rps": round(len(latencies) / elapsed, 2),
        "latency_ms": {"p50": round(float(np.percentile(lat_ms, 50)), 2), "p99": round(float(np.percentile(lat_ms, 99)), 2),
                       "mean": round(float(lat_ms.mean()), 2), "max": round(float(lat_ms.max()), 2)},
        "encoder_batches": int(batches), "mean_batch_size": round((sum1 - sum0) / batches, 3) if batches else None,
        "model": model.get("model"), "method": model.get("method"), "image_size": model.get("preprocess", {}).get("image_size"),
        "machine": {"platform": platform.platform(), "python": platform.python_version()},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def write(result: dict, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"load_c{result['concurrency']}_{time.strftime('%Y%m%d-%H%M%S')}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lat = result["latency_ms"]
    stem.with_suffix(".md").write_text(
        f"# Load test: {result['model']} ({result['method']}), concurrency {result['concurrency']}\n\n"
        f"| concurrency | seconds | ok | errors | throughput (req/s) | p50 ms | p99 ms | mean batch size |\n"
        f"|---|---|---|---|---|---|---|---|\n"
        f"| {result['concurrency']} | {result['seconds']} | {result['requests_ok']} | {result['errors']} | "
        f"{result['throughput_rps']} | {lat['p50']} | {lat['p99']} | {result['mean_batch_size']} |\n\n"
        f"POST {result['endpoint']} with real photos from hymenoptera-val; {result['machine']['platform']}; "
        f"{result['created']}. Mean batch size: requests per image-encoder call (BentoML adaptive batching, "
        f"from /metrics).\n")
    return stem


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:3000")
    parser.add_argument("--concurrency", "-c", type=int, default=8)
    parser.add_argument("--seconds", "-t", type=float, default=20.0)
    parser.add_argument("--images", type=int, default=32, help="distinct photos to cycle through")
    parser.add_argument("--labels", help='zero-shot labels as a JSON list, e.g. \'["ant", "bee"]\'')
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args()
    if not args.url.startswith(("http://127.", "http://localhost", "http://[::1]")):
        raise SystemExit("load tests run on loopback only")
    result = asyncio.run(run(args.url, args.concurrency, args.seconds, args.images, args.labels))
    stem = write(result, args.out)
    print(json.dumps({k: result[k] for k in ("concurrency", "requests_ok", "errors", "throughput_rps",
                                             "latency_ms", "mean_batch_size")}))
    print(f"wrote {stem}.json and .md")


if __name__ == "__main__":
    main()
