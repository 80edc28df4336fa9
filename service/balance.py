"""Spread keep-alive connections over the service's worker processes.

The workers share one listening socket, and a burst of new connections goes to whichever worker accepts first,
often all of them to one (asyncio and libuv accept every pending connection at each wake-up; BentoML issue
#5426).  A client that keeps its connection open then stays on that worker for good, and the other worker idles
(bench/results/service_vs_raw_vitb32.md).

So the workers post how many requests each has in flight on a shared board (a small memory-mapped file), and a
worker that has at least 2 more in flight than the least busy one answers with ``Connection: close``: that
client reconnects, and the idle worker, waiting in accept, usually takes it.  A balanced server never closes a
connection; a lopsided one is evened out after a few responses (measured against the earlier rule of closing
every 8th response: bench/results/service_vs_raw_vitb32.md).

Turn it off (``ORTHSERVE_BALANCE=0``) behind a load balancer or an ingress that already spreads connections
over replicas, or where every client opens a new connection per request: then there is nothing to even out,
and closing a connection only costs the client a reconnect.
"""
from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np

BOARD_PREFIX = "orthserve-in-flight-"


class InFlightBoard:
    """Requests in flight per worker, one int32 slot each, in a file every worker of one server maps.

    Each worker writes only its own slot (from its one event-loop thread), so no lock is needed; reading the
    others' slots a moment stale only delays a reconnect."""

    def __init__(self, path: Path, workers: int, worker_index: int) -> None:
        if not 0 <= worker_index < workers:
            raise ValueError(f"worker_index {worker_index} is outside 0..{workers - 1}")
        with open(path, "a+b") as f:  # every worker may create it; growing to the same size twice is harmless
            if os.fstat(f.fileno()).st_size < 4 * workers:
                os.ftruncate(f.fileno(), 4 * workers)
        self.slots = np.memmap(path, dtype=np.int32, mode="r+", shape=(workers,))
        self.mine = worker_index
        self.slots[self.mine] = 0  # a restarted worker starts from nothing in flight

    @classmethod
    def for_this_server(cls, workers: int, folder: Path | None = None) -> InFlightBoard | None:
        """The board shared by this server's workers (their common parent process names it), or None where this
        process is not a numbered BentoML worker (tests, one worker: nothing to balance), and where BentoML no
        longer says which worker this is (fails soft: no balancing, one warning)."""
        import bentoml

        index = getattr(getattr(bentoml, "server_context", None), "worker_index", None)  # public since BentoML 1.2
        if workers < 2:
            return None
        if index is None:
            if getattr(bentoml, "server_context", None) is None:
                logging.getLogger("orthserve.service").warning(
                    "this BentoML has no bentoml.server_context.worker_index: connection balancing is off")
            return None
        folder = folder or board_folder()
        remove_boards_of_stopped_servers(folder)
        return cls(folder / f"{BOARD_PREFIX}{os.getppid()}-{workers}", workers, index - 1)

    def should_hand_off(self) -> bool:
        """At least 2 more in flight here than at the least busy worker: moving one client narrows the gap."""
        return int(self.slots[self.mine]) - int(self.slots.min()) >= 2


def board_folder() -> Path:
    """Shared memory where Linux has it (the board never touches a disk), else the temp folder."""
    return Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())


def remove_boards_of_stopped_servers(folder: Path) -> None:
    """Boards are a few bytes each, but one is left per server run; the next server clears those of dead ones."""
    for board in folder.glob(f"{BOARD_PREFIX}*"):
        try:
            os.kill(int(board.name[len(BOARD_PREFIX):].split("-")[0]), 0)
        except ProcessLookupError:
            board.unlink(missing_ok=True)
        except (ValueError, OSError):
            pass  # not one of ours, or another user's live server


class ConnectionBalancer:
    """ASGI middleware: counts this worker's requests in flight on the board, and answers ``Connection: close``
    when this worker is the busier one by 2 or more."""

    def __init__(self, app: Callable, workers: int, board: InFlightBoard | None = None) -> None:
        self.app = app
        from .settings import settings

        self.board = board if board is not None else (InFlightBoard.for_this_server(workers) if settings().balance else None)

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        board = self.board
        if scope["type"] != "http" or board is None:
            return await self.app(scope, receive, send)

        async def send_balancing(message: dict) -> None:
            if message["type"] == "http.response.start" and board.should_hand_off():
                message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            await send(message)

        board.slots[board.mine] += 1
        try:
            await self.app(scope, receive, send_balancing)
        finally:
            board.slots[board.mine] -= 1
