"""`mdmt bench serve`: serving throughput and latency, in-process and through the dev server.

Measures the `serving_default` signature (serialized tf.Examples in, one probability per
task out) of a SavedModel:
  * in-process (the loaded signature called directly): examples/s at batch 1024 and
    p50 / p99 latency at batch 1 and 64. Targets: >= 50k examples/s, p50 <= 5 ms at batch 1.
  * through the local development server (serving.devserver, started in this process
    on free loopback ports) over REST and gRPC with serving.client: the same figures,
    which add serialization, HTTP/gRPC and Python request handling.
Without --model-dir it first trains a model for one epoch on the synthetic data (a
throw-away directory), so the figures are for a real exported model, warmup included.
"""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np

from mdmt_tf._project import project_module

TARGETS = {"throughput_1024": 50_000.0, "p50_ms_1": 5.0}
LATENCY_BATCHES = (1, 64)
THROUGHPUT_BATCH = 1024


def _train_default(out: Path, model: str, rows: int, serving_precision: str = "float32") -> Path:
    from mdmt_tf.data.dataset import MDMTData
    from mdmt_tf.data.sources import load_source
    from mdmt_tf.models import ModelConfig
    from mdmt_tf.training.config import TrainConfig
    from mdmt_tf.training.fit import train

    print(f"[bench] training {model} for 1 epoch on synthetic:{rows} to get a SavedModel "
          f"({serving_precision}) ...", flush=True)
    data = MDMTData.build(*load_source(f"synthetic:{rows}"))
    config = TrainConfig(epochs=1, batch_size=2048, serving_precision=serving_precision)
    train(ModelConfig(model, {}), data, config, out, plots=False, verbose=0)
    return out / "model"


def _examples(model_dir: Path, count: int) -> list[bytes]:
    from mdmt_tf.data.readers import example_bytes
    from mdmt_tf.data.synthetic import SyntheticConfig, generate
    from mdmt_tf.export.savedmodel import read_metadata
    from mdmt_tf.spec import DatasetSpec

    spec = DatasetSpec.from_dict(read_metadata(model_dir)["spec"])
    table = generate(SyntheticConfig(rows=max(count, 10), seed=1))
    return example_bytes(table.head(count), spec, with_labels=False)


def _latencies(call, batch: list[bytes], requests: int) -> np.ndarray:
    for _ in range(min(20, requests)):
        call(batch)
    times = []
    for _ in range(requests):
        start = time.perf_counter()
        call(batch)
        times.append(time.perf_counter() - start)
    return np.asarray(times)


def measure(call, examples: list[bytes], requests: int, trials: int) -> dict:
    """p50/p99 ms at batch 1 and 64, examples/s at batch 1024 (median of trials)."""
    out = {}
    for batch in LATENCY_BATCHES:
        times = _latencies(call, examples[:batch], requests)
        out[f"p50_ms_{batch}"] = float(np.percentile(times, 50) * 1e3)
        out[f"p99_ms_{batch}"] = float(np.percentile(times, 99) * 1e3)
    big = examples[:THROUGHPUT_BATCH]
    rates = [THROUGHPUT_BATCH / float(np.median(_latencies(call, big, max(5, requests // 20)))) for _ in range(trials)]
    out[f"throughput_{THROUGHPUT_BATCH}"] = float(np.median(rates))
    return out


def _in_process_call(model_dir: Path):
    import tensorflow as tf

    signature = tf.saved_model.load(str(model_dir)).signatures["serving_default"]

    def call(batch):
        return {k: v.numpy() for k, v in signature(examples=tf.constant(batch)).items()}

    return call


def _through_server(model_dir: Path, examples: list[bytes], requests: int, trials: int) -> dict:
    from mdmt_tf.export.savedmodel import publish_version
    ServingClient = project_module("serving.client").ServingClient
    devserver = project_module("serving.devserver.server")
    LocalServer, ServerOptions = devserver.LocalServer, devserver.ServerOptions

    results = {}
    with tempfile.TemporaryDirectory(prefix="mdmt-bench-serve-") as base:
        publish_version(model_dir, base)
        server = LocalServer(ServerOptions(Path(base), rest_port=0, grpc_port=0, poll_seconds=60)).start()
        try:
            for protocol, port in (("rest", server.rest_port), ("grpc", server.grpc_port)):
                with ServingClient(f"127.0.0.1:{port}", protocol=protocol, timeout=60) as client:
                    results[protocol] = measure(client.predict_examples, examples, requests, trials)
        finally:
            server.stop()
    return results


def _report(results: dict) -> str:
    from mdmt_tf.report.tables import markdown_table

    rows = []
    for where, r in results.items():
        rows.append([where, f"{r['throughput_1024']:,.0f}", f"{r['p50_ms_1']:.2f}", f"{r['p99_ms_1']:.2f}",
                     f"{r['p50_ms_64']:.2f}", f"{r['p99_ms_64']:.2f}"])
    table = markdown_table(["serving_default", "examples/s @1024", "p50 ms @1", "p99 ms @1", "p50 ms @64",
                            "p99 ms @64"], rows)
    inproc = results["in-process"]
    verdict = (f"targets (in-process): >= {TARGETS['throughput_1024']:,.0f} examples/s at batch 1024: "
               f"{'met' if inproc['throughput_1024'] >= TARGETS['throughput_1024'] else 'MISSED'}; "
               f"p50 <= {TARGETS['p50_ms_1']} ms at batch 1: "
               f"{'met' if inproc['p50_ms_1'] <= TARGETS['p50_ms_1'] else 'MISSED'}")
    return table + "\n\n" + verdict


def run(model_dir: str | None, model: str = "mmoe", rows: int = 20_000, requests: int = 300, trials: int = 3,
        servers: bool = True, serving_precision: str = "float32") -> dict:
    import os

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    with tempfile.TemporaryDirectory(prefix="mdmt-bench-model-") as tmp:
        path = Path(model_dir) if model_dir else _train_default(Path(tmp), model, rows, serving_precision)
        if not (path / "saved_model.pb").exists():
            from mdmt_tf.errors import ConfigError

            raise ConfigError(f"--model-dir {path} is not a SavedModel directory (no saved_model.pb)")
        examples = _examples(path, THROUGHPUT_BATCH)
        print(f"[bench] in-process serving_default of {path} ...", flush=True)
        results = {"in-process": measure(_in_process_call(path), examples, requests, trials)}
        if servers:
            print("[bench] through the local dev server (REST, gRPC) ...", flush=True)
            for protocol, r in _through_server(path, examples, requests, trials).items():
                results[f"dev server {protocol}"] = r
    print()
    print(_report(results))
    return results


def cmd_bench_serve(args) -> int:
    results = run(args.model_dir, model=args.model, rows=args.rows, requests=args.requests, trials=args.trials,
                  servers=not args.in_process_only, serving_precision=args.serving_precision)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


def add_parser(kinds) -> None:
    """Add `serve` to the `mdmt bench` sub-commands."""
    p = kinds.add_parser("serve", help="serving_default throughput (batch 1024) and p50/p99 latency (batch 1, 64): "
                                       "in-process and through the local dev server over REST and gRPC")
    p.add_argument("--model-dir", default=None, help="SavedModel to measure (default: train one for 1 epoch)")
    p.add_argument("--model", default="mmoe", help="model to train when no --model-dir is given")
    p.add_argument("--rows", type=int, default=20_000, help="synthetic rows to train on when no --model-dir is given")
    p.add_argument("--requests", type=int, default=300, help="timed requests per latency figure")
    p.add_argument("--trials", type=int, default=3, help="throughput trials (the median is reported)")
    p.add_argument("--serving-precision", default="float32", choices=("float32", "bfloat16"),
                   help="export precision of the model trained when no --model-dir is given")
    p.add_argument("--in-process-only", action="store_true", help="skip the dev server measurements")
    p.add_argument("--json", default=None, help="also write the results here")
    p.set_defaults(func=cmd_bench_serve)
