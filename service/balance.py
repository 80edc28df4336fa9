"""Spread keep-alive connections over the service's worker processes.

The workers share one listening socket, and the kernel hands a burst of new connections to whichever worker
accepts first, often all to one (BentoML issue #5426).  A client that keeps its connections open then stays on
that worker for good: 8 clients on 2 workers, ViT-B-32, ran at 9.5 req/s in 2 of 8 rounds against 17 req/s
when spread (bench/results/service_vs_raw_vitb32.md).  So, like nginx's ``keepalive_requests``, each worker
asks the client to reconnect (``Connection: close``) after every ``every``-th response it sends.  A busy worker
sends more responses, so it lets go of more connections, and the reconnects go to whichever worker accepts
first, usually the idle one.  Measured (2026-12-03, 2 CPUs, 2 workers, 6 s rounds, each with new connections):
orthserve-mini, closing every 8th against never, the two servers alternating: median paired ratio 0.98 at 8
clients and 1.00 at 32, while never closing had rounds at 134-148 req/s (one worker idle) against 170-180.
ViT-B-32 at 8 clients: 15.3-17.4 req/s in all 8 rounds (never closing: 9.4-9.6 in 2 of 8).  At 32 clients a
6 s round of ViT-B-32 (about 100 requests) is too short to undo a bad start every time (one of 5 at 11.6).
"""
from __future__ import annotations

import os
from typing import Callable

CLOSE_EVERY = int(os.environ.get("ORTHSERVE_CLOSE_EVERY", "8"))  # 0: never ask clients to reconnect


class ConnectionRecycler:
    """ASGI middleware: ``Connection: close`` on every ``every``-th HTTP response of this worker."""

    def __init__(self, app: Callable, every: int = CLOSE_EVERY) -> None:
        self.app, self.every, self.responses = app, every, 0

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or self.every <= 0:
            return await self.app(scope, receive, send)

        async def send_recycling(message: dict) -> None:
            if message["type"] == "http.response.start":
                self.responses += 1
                if self.responses % self.every == 0:
                    message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            await send(message)

        await self.app(scope, receive, send_recycling)
