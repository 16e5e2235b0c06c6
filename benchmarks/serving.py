"""Zero-shot images/s over the 200 textile test images: in process and through `mlflow models serve`.

    python benchmarks/serving.py                      # trains a short tiny run first (a temporary store)
    python benchmarks/serving.py --model <run id> --tracking-uri sqlite:////abs/mlflow.db

(a) in process: ``mlflow.pyfunc.load_model(...).predict(df_of_base64_images, params={"task": "zero_shot"})``;
(b) served: the same model behind ``mlflow models serve --env-manager local`` on a loopback port, the
images sent as base64 in JSON requests of ``--request-size`` rows (the payloads are built before the
clock starts; the time is the HTTP round trips: parsing, decoding, the model, the JSON answer).
Each is timed ``--repeats`` times after one warm-up pass; the median and range are printed.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def test_split(tmp: Path, uri: str, model: str | None):
    """(run id, the 200 test image paths): trains `experiment=smoke` on all 2,000 images for 2 steps when no model is given."""
    from clipexp.config.compose import compose as compose_and_validate
    from clipexp.training.trainer import Trainer

    overrides = ["experiment=smoke", "data.max_samples=null", "trainer.max_steps=2", f"tracking.uri={uri}", "tracking.pyfunc_model=true"]
    cfg = compose_and_validate(overrides)
    trainer = Trainer(cfg, tmp / "run")
    if model is None:
        try:
            trainer.setup()
            trainer.train()
        finally:
            trainer.cleanup("FINISHED")
        return trainer.tracker.run_id, trainer.data.test.image_paths
    from omegaconf import OmegaConf

    from clipexp.data.dataset import build_datasets
    from clipexp.models.loading import load_clip

    _, processor = load_clip(None, OmegaConf.to_container(cfg.model.architecture), cfg.model.image_resolution, cfg.model.max_sequence_length)
    data = build_datasets(OmegaConf.to_container(cfg.data, resolve=True), processor=processor, image_resolution=cfg.model.image_resolution,
                          max_sequence_length=cfg.model.max_sequence_length, seed=cfg.seed,
                          image_interpolation=cfg.model.image_interpolation)
    return model, data.test.image_paths


def timed(fn, repeats: int):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def serve(run_id: str, uri: str, cwd: Path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m", f"runs:/{run_id}/clip",
                             "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)], cwd=cwd, env=env,
                            stdout=open(cwd / "serve.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    started = time.perf_counter()
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2):
                return proc, port, time.perf_counter() - started
        except OSError:
            if proc.poll() is not None or time.perf_counter() - started > 600:
                raise RuntimeError(f"the server did not start; see {cwd / 'serve.log'}")
            time.sleep(0.5)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="a run id with a logged clip model (default: train one)")
    ap.add_argument("--tracking-uri", default=None)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--request-size", type=int, default=50, help="images per HTTP request")
    args = ap.parse_args()

    import mlflow
    import pandas as pd
    import torch

    tmp = Path(tempfile.mkdtemp(prefix="clipexp-serving-bench-"))
    uri = args.tracking_uri or f"sqlite:///{tmp / 'mlflow.db'}"
    run_id, paths = test_split(tmp, uri, args.model)
    mlflow.set_tracking_uri(uri)
    model = mlflow.pyfunc.load_model(f"runs:/{run_id}/clip")
    frame = pd.DataFrame({"image": [base64.b64encode(Path(p).read_bytes()).decode() for p in paths]})  # a served model takes bytes
    local_times = timed(lambda: model.predict(frame, params={"task": "zero_shot"}), args.repeats)
    expected = model.predict(frame, params={"task": "zero_shot"})["predicted_class"].tolist()

    proc, port, startup = serve(run_id, uri, tmp)
    try:
        images = [base64.b64encode(Path(p).read_bytes()).decode() for p in paths]
        bodies = [json.dumps({"dataframe_split": {"columns": ["image"], "data": [[im] for im in images[i:i + args.request_size]]},
                              "params": {"task": "zero_shot"}}).encode() for i in range(0, len(images), args.request_size)]
        served = []

        def post_all():
            served.clear()
            for body in bodies:
                req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body, headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(req, timeout=600) as resp:
                    served.extend(r["predicted_class"] for r in json.loads(resp.read())["predictions"])

        served_times = timed(post_all, args.repeats)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
    n = len(paths)
    kb = sum(len(b) for b in bodies) / 1024
    print(f"zero_shot over {n} textile test images, tiny model (64 px), torch threads {torch.get_num_threads()}, "
          f"{os.cpu_count()} CPUs; {args.repeats} repeats after a warm-up")
    for name, times in (("in process (pyfunc.predict)", local_times),
                        (f"mlflow models serve ({len(bodies)} requests of {args.request_size}, {kb:.0f} KiB JSON)", served_times)):
        rates = sorted(n / t for t in times)
        print(f"  {name:<60} {statistics.median(rates):8.1f} images/s  [{rates[0]:.1f}-{rates[-1]:.1f}]")
    print(f"  server start to first /ping: {startup:.1f} s; served answers equal in-process: {served == expected}")


if __name__ == "__main__":
    main()
