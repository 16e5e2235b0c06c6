"""Load test of the served model: N concurrent clients, a fixed number of requests, bad requests mixed in.

    python benchmarks/serving_load.py                               # trains a 2-step tiny run first (a temporary store)
    python benchmarks/serving_load.py --clients 4 --requests 200    # per client
    python benchmarks/serving_load.py --model <run id> --tracking-uri sqlite:////abs/mlflow.db

The run's LoggedModel is served with ``mlflow models serve --env-manager local`` on 127.0.0.1 only (there is
no host option: nothing leaves the machine), with small limits so oversized requests are cheap to make
(``CLIPEXP_MAX_ROWS``, ``CLIPEXP_MAX_REQUEST_BYTES``, ``CLIPEXP_MAX_IMAGE_BYTES``, ``CLIPEXP_MAX_IMAGE_PIXELS``).
After a warm-up (each client ``--warmup`` valid requests and one of each bad kind, all at once, so the
server's threads and allocator have seen every size of request), ``--clients`` threads (one keep-alive connection each) send ``--requests`` requests each:
valid zero_shot requests of ``--rows`` base64 images, and every ``--bad-every``-th request one of the bad
kinds below, in turn. The run is bounded: ``--max-seconds`` stops the clients (what was sent is reported).

Reported: images/s (valid images answered / wall time), p50 / p95 / p99 latency of the valid requests,
errors on valid requests (any non-200 or row error), each bad kind's count and how many were refused with
their own reason, and the server's resident memory (its process tree, from /proc) after the warm-up and
at the end. A markdown table is printed.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import os
import platform
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving import serve, test_split  # the sibling benchmark: trains the run, starts `mlflow models serve`

LIMITS = {"CLIPEXP_MAX_ROWS": "16", "CLIPEXP_MAX_REQUEST_BYTES": str(2 * 2**20), "CLIPEXP_MAX_IMAGE_BYTES": str(256 * 2**10),
          "CLIPEXP_MAX_IMAGE_PIXELS": "4000000"}


def _png(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def bad_requests(good: str) -> list:
    """(kind, body bytes, expected HTTP status, the reason the answer must give)."""
    import numpy as np
    from PIL import Image

    noisy = _png(Image.fromarray(np.random.default_rng(0).integers(0, 256, (400, 400, 3), dtype=np.uint8)))  # ~470 KB
    wide = _png(Image.new("RGB", (3000, 2000), (90, 60, 30)))  # 6 MP, a few KB

    def frame(images):
        return json.dumps({"dataframe_split": {"columns": ["image"], "data": [[im] for im in images]},
                           "params": {"task": "zero_shot"}}).encode()

    return [
        ("too many rows (17 > 16)", frame([good] * 17), 400, "CLIPEXP_MAX_ROWS"),
        ("request over 2 MiB", frame([noisy] * 5), 400, "CLIPEXP_MAX_REQUEST_BYTES"),
        ("image over 256 KiB", frame([noisy]), 200, "CLIPEXP_MAX_IMAGE_BYTES"),
        ("image over 4 MP", frame([wide]), 200, "CLIPEXP_MAX_IMAGE_PIXELS"),
        ("a server path", frame(["../../../../etc/hostname"]), 200, "is not base64-encoded image data"),
        ("bytes that are no image", frame([base64.b64encode(os.urandom(3000)).decode()]), 200, "is not an image file"),
        ("malformed JSON", b'{"dataframe_split": {"columns": ["image"], "data": [[', 400, ""),
    ]


def rss_kib(root_pid: int) -> int:
    """Resident memory of a process and all its descendants (KiB)."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    total, todo = 0, [root_pid]
    while todo:
        pid = todo.pop()
        todo.extend(children.get(pid, []))
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total


def post(conn: http.client.HTTPConnection, body: bytes):
    conn.request("POST", "/invocations", body=body, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    return resp.status, resp.read()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="a run id with a logged clip model (default: train one)")
    ap.add_argument("--tracking-uri", default=None)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--requests", type=int, default=200, help="requests per client")
    ap.add_argument("--rows", type=int, default=4, help="images per valid request")
    ap.add_argument("--bad-every", type=int, default=10, help="every n-th request of a client is a bad one")
    ap.add_argument("--warmup", type=int, default=20, help="valid requests per client (then one of each bad kind), all clients "
                                                           "at once, before the clock and the first memory reading")
    ap.add_argument("--max-seconds", type=float, default=300.0, help="stop the clients after this long")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="clipexp-serving-load-"))
    uri = args.tracking_uri or f"sqlite:///{tmp / 'mlflow.db'}"
    run_id, paths = test_split(tmp, uri, args.model)
    images = [base64.b64encode(Path(p).read_bytes()).decode() for p in paths]
    valid = [json.dumps({"dataframe_split": {"columns": ["image"], "data": [[im] for im in images[i:i + args.rows]]},
                         "params": {"task": "zero_shot"}}).encode() for i in range(0, len(images) - args.rows + 1, args.rows)]
    bad = bad_requests(images[0])

    os.environ.update(LIMITS)  # the server inherits them
    proc, port, startup = serve(run_id, uri, tmp)
    try:
        def warm(c: int) -> None:  # as the measured phase: every client at once, valid and bad requests
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            for i in range(args.warmup):
                status, _ = post(conn, valid[(c + i) % len(valid)])
                assert status == 200, status
            for _, body, want, _ in bad:
                assert post(conn, body)[0] == want
            conn.close()

        warmers = [threading.Thread(target=warm, args=(c,)) for c in range(args.clients)]
        for t in warmers:
            t.start()
        for t in warmers:
            t.join()
        rss_start = rss_kib(proc.pid)

        lock = threading.Lock()
        latencies, valid_errors, answered = [], [], [0]
        bad_seen = {kind: [0, 0] for kind, *_ in bad}  # kind -> [sent, refused with its reason]
        deadline = time.perf_counter() + args.max_seconds

        def client(c: int) -> None:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            for r in range(args.requests):
                if time.perf_counter() > deadline:
                    break
                if (r + 1) % args.bad_every == 0:
                    kind, body, want, reason = bad[(c + r // args.bad_every) % len(bad)]
                    status, raw = post(conn, body)
                    text = raw.decode(errors="replace")
                    ok = status == want and reason in text
                    with lock:
                        bad_seen[kind][0] += 1
                        bad_seen[kind][1] += ok
                    continue
                body = valid[(c * 7 + r) % len(valid)]
                start = time.perf_counter()
                status, raw = post(conn, body)
                took = time.perf_counter() - start
                rows = json.loads(raw).get("predictions", []) if status == 200 else []
                with lock:
                    latencies.append(took)
                    if status != 200 or any(row.get("error") for row in rows) or len(rows) != args.rows:
                        valid_errors.append(status)
                    else:
                        answered[0] += len(rows)
            conn.close()

        threads = [threading.Thread(target=client, args=(c,)) for c in range(args.clients)]
        started = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - started
        rss_end = rss_kib(proc.pid)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)

    q = statistics.quantiles(latencies, n=100, method="inclusive") if len(latencies) > 1 else [latencies[0]] * 99
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("model name")), "?")
    print(f"\nserved model: tiny CLIP (64 px) of run {run_id}, `mlflow models serve --env-manager local` on 127.0.0.1:{port} "
          f"(start to first /ping {startup:.1f} s); machine: {os.cpu_count()} x {cpu}, {platform.system()} {platform.release()}")
    print(f"{args.clients} clients x {args.requests} requests ({args.rows} images per valid request, every {args.bad_every}th "
          f"request a bad one), after a warm-up of {args.warmup} valid + {len(bad)} bad requests per client; limits {LIMITS}\n")
    print("| metric | value |\n|---|---|")
    print(f"| valid requests | {len(latencies)} ({answered[0]} images answered) |")
    print(f"| wall time | {wall:.1f} s |")
    print(f"| images/s | {answered[0] / wall:.1f} |")
    print(f"| latency p50 / p95 / p99 | {q[49] * 1000:.0f} / {q[94] * 1000:.0f} / {q[98] * 1000:.0f} ms |")
    print(f"| errors on valid requests | {len(valid_errors)} |")
    print(f"| server RSS after warm-up / at the end | {rss_start / 1024:.0f} / {rss_end / 1024:.0f} MiB "
          f"({100 * (rss_end - rss_start) / rss_start:+.1f}%) |")
    for kind, (sent, refused) in bad_seen.items():
        print(f"| bad: {kind} | {refused} of {sent} refused with their reason |")


if __name__ == "__main__":
    main()
