"""Ordered delivery of a run's tracking writes from a background thread, held while the store is down.

Training never waits on the tracking store: ``put`` queues a write (a JSON-able ``(kind, payload)``
pair) and returns. One sender thread delivers the writes in order. When a delivery fails with an error
the caller classes as retryable (a locked SQLite file, a server that stopped), the sender logs *one*
warning for the outage, keeps every write queued and retries every ``retry_s`` seconds; when the store
answers again it delivers the backlog (consecutive metric writes merged into batches) and logs that it
did. A write the store rejects for what it is (a bad value) is dropped with an error line; it never
blocks the writes after it.

``close`` waits up to ``timeout_s`` for the backlog to drain (retrying every second meanwhile). What
still could not be delivered is written to ``spool`` (JSON lines, one write each) and returned.

This module knows nothing about MLflow: :mod:`clipexp.tracking.tracker` supplies ``deliver`` (one call for a
list of writes of one kind) and ``retryable``.
"""

from __future__ import annotations

import collections
import json
import logging
import threading
import time
from pathlib import Path
from typing import Any, Callable, Deque, List, Optional, Sequence, Tuple

log = logging.getLogger(__name__)

Write = Tuple[str, Any]
THREAD_NAME = "clipexp-tracking"


class _FromSender(logging.Filter):
    """Drops the records the store's libraries log from background threads (the outbox's sender, MLflow's
    system-metrics sampler and its logging queue): MLflow logs every failed SQLite call with an 80-line traceback,
    and the outbox's one warning stands for them. The main thread's records (creating the run) still show."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.threadName == "MainThread"


_FILTER = _FromSender()


class Outbox:
    def __init__(self, deliver: Callable[[str, List[Any]], None], retryable: Callable[[BaseException], bool], store: str,
                 retry_s: float = 30.0, spool: Optional[Path] = None, merge: Sequence[str] = ("metrics",),
                 merge_limit: int = 1000, quiet_loggers: Sequence[str] = (), gone: Optional[Callable[[], Optional[str]]] = None):
        self._deliver, self._retryable, self.store, self._gone = deliver, retryable, store, gone
        self.gone_reason: Optional[str] = None  # set when the store itself is gone: nothing more is sent, all is spooled
        self.retry_s, self.spool = float(retry_s), spool
        self._merge, self._merge_limit = set(merge), merge_limit
        self._queue: Deque[Write] = collections.deque()
        self._cond = threading.Condition()
        self._closing = False
        self.offline_since: Optional[float] = None
        self.delivered = 0
        for name in quiet_loggers:  # (kept after close: a call close gave up on may still fail later)
            if _FILTER not in logging.getLogger(name).filters:
                logging.getLogger(name).addFilter(_FILTER)
        self._thread = threading.Thread(target=self._run, name=THREAD_NAME, daemon=True)
        self._thread.start()

    def put(self, kind: str, payload: Any) -> None:
        with self._cond:
            self._queue.append((kind, payload))
            self._cond.notify()

    def pending(self) -> int:
        with self._cond:
            return len(self._queue)

    # ------------------------------------------------------------------------------------ the sender
    def _head(self) -> Optional[Tuple[str, List[Any]]]:
        """The next write, with the same-kind writes after it when its kind merges (up to the limit)."""
        with self._cond:
            while not self._queue and not self._closing:
                self._cond.wait()
            if not self._queue:
                return None
            kind = self._queue[0][0]
            if kind not in self._merge:
                return kind, [self._queue[0][1]]
            payloads, size = [], 0
            for k, p in self._queue:
                if k != kind or (payloads and size + len(p.get("values", ())) > self._merge_limit):
                    break
                payloads.append(p)
                size += len(p.get("values", ()))
            return kind, payloads

    def _run(self) -> None:
        while (head := self._head()) is not None:
            kind, payloads = head
            # a store deleted or replaced under the run may still take writes (SQLite into the unlinked file, or a new
            # empty store): nothing more goes there; close spools everything, and replay recreates the run
            why = self._gone() if self._gone is not None else None
            if why is not None:
                self._store_gone(why)
                return
            try:
                self._deliver(kind, payloads)
            except Exception as err:  # noqa: BLE001 - the store's failures must never reach training
                why = self._gone() if self._gone is not None else None
                if why is not None:
                    self._store_gone(why)
                    return
                if self._retryable(err):
                    self._went_offline(err)
                    self._pause()
                    continue
                log.error("tracking: the store rejected a %s write, dropped (the run folder has the values): %s",
                          kind, _first_line(err))
            with self._cond:
                for _ in payloads:
                    if self._queue:  # (empty when close gave up on this call and spooled it)
                        self._queue.popleft()
            self.delivered += len(payloads)
            if self.offline_since is not None:
                log.warning("tracking: the store %s answers again after %.0f s; the writes held meanwhile are delivered "
                            "(%d queued)", self.store, time.time() - self.offline_since, self.pending())
                self.offline_since = None

    def _pause(self) -> None:
        """Wait ``retry_s`` before the next attempt (new writes do not cut it short); 1 s once closing."""
        with self._cond:
            until = time.monotonic() + self.retry_s
            while not self._closing and (left := until - time.monotonic()) > 0:
                self._cond.wait(timeout=left)
        if self._closing:
            time.sleep(1.0)

    def _store_gone(self, why: str) -> None:
        self.gone_reason = why
        log.warning("tracking: %s; training goes on and the run folder keeps every write%s: `clipexp replay %s` recreates the "
                    "run in a store once there is one", why, f" ({self.spool} at the end)" if self.spool else "",
                    self.spool.parent if self.spool else "<run dir>")
        with self._cond:  # wait for close, which spools the whole queue
            while not self._closing:
                self._cond.wait()

    def _went_offline(self, err: BaseException) -> None:
        if self.offline_since is None:
            self.offline_since = time.time()
            log.warning("tracking: the store %s is unreachable (%s); training goes on, its metrics are held in memory "
                        "and retried every %g s, and the run folder keeps metrics.json", self.store, _first_line(err),
                        self.retry_s)

    # ------------------------------------------------------------------------------------- closing
    def close(self, timeout_s: float) -> List[Write]:
        """Wait up to ``timeout_s`` for every write to be delivered; spool and return the rest."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join(timeout=max(0.0, timeout_s))
        with self._cond:
            left = list(self._queue)
            self._queue.clear()  # the sender, if still in a call, finds nothing more to send
        if left and self.spool is not None:
            self.spool.parent.mkdir(parents=True, exist_ok=True)
            with open(self.spool, "a") as fh:
                for kind, payload in left:
                    fh.write(json.dumps({"kind": kind, "payload": payload}, default=str) + "\n")
        return left


def read_spool(path: Path) -> List[Write]:
    """The writes ``close`` spooled, in order."""
    out = []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            item = json.loads(line)
            out.append((item["kind"], item["payload"]))
    return out


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return (text.splitlines()[0] if text else type(err).__name__)[:300]
