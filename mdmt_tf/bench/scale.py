"""`mdmt bench scale`: what a production-size vocabulary costs a training step.

`vocab`: for MMoE and M3oE, the median time of a training step (the trainer `mdmt train`
builds, default settings, batch 2048, the synthetic data's batches) with the synthetic
vocabulary (~4k users, ~2k items) and with the same batches looked up in tables of 10M
users and 1M items (the ids spread over the table by a fixed permutation-like hash), each
configuration in its own process. `slowdown` = large / small with the default weight
optimizer (`--embedding-optimizer auto`: RowSparseAdam for the large tables); `dense_adam`
times the large tables with Keras' Adam, which updates every row each step, for contrast.

`rows`: `mdmt train --model mmoe --epochs 1` streaming from gzip TFRecord shards
(`--data shards:DIR`, 8 shards per split, written once under `--root` by `mdmt data
synthetic --shards`) at each row count, in its own process: its peak RSS and its training
examples/s; and the in-memory path (`--data synthetic:N`) at the row counts where it fits,
for the throughput ratio. `pipeline`: the local TFX pipeline (`mdmt bench pipeline`, MMoE,
one epoch) at `--pipeline-rows` rows with Beam's DirectRunner in multi-processing mode (2
workers); null when not run.
"""
from __future__ import annotations

import dataclasses
import json
import resource
import subprocess
import sys

LARGE = {"user_id": 10_000_000, "item_id": 1_000_000}
MODELS = ("mmoe", "m3oe")
HASH = 2_654_435_761  # Knuth's multiplicative constant: spreads consecutive ids over the table


def widen(enc, sizes: dict):
    """The encoded data with the tables of `sizes`' fields that large: each id i > 0 (0 stays
    the OOV row) moves to 1 + (i * HASH) mod (size - 1), so a batch's rows are spread over
    the table as a production vocabulary's would be."""
    import numpy as np

    schema = dataclasses.replace(enc.schema, sparse=tuple((name, sizes.get(name, size))
                                                          for name, size in enc.schema.sparse))
    features = {}
    for split, columns in enc.features.items():
        columns = dict(columns)
        for name, size in sizes.items():
            ids = np.asarray(columns[name]).astype(np.int64)
            columns[name] = np.where(ids > 0, 1 + (ids * HASH) % (size - 1), 0).astype(np.int32)
        features[split] = columns
    return dataclasses.replace(enc, schema=schema, features=features)


def run_vocab(model_name: str, large: bool, optimizer: str, batch_size: int, steps: int, trials: int) -> dict:
    """One configuration's median ms per training step (`main` runs each in a subprocess)."""
    import keras

    from mdmt_tf.bench.train import _median, timed_fit
    from mdmt_tf.data.dataset import MDMTData
    from mdmt_tf.data.sources import load_source
    from mdmt_tf.models import build_model
    from mdmt_tf.training.config import TrainConfig
    from mdmt_tf.training.encoded import EncodedData
    from mdmt_tf.training.factory import make_trainer
    from mdmt_tf.training.runtime import resolve_precision

    keras.utils.set_random_seed(0)
    precision = resolve_precision("auto")
    enc = EncodedData.from_data(MDMTData.build(*load_source("synthetic")))
    if large:
        enc = widen(enc, LARGE)
    model = build_model(model_name, enc.schema, dtype=precision)
    config = TrainConfig(batch_size=batch_size, precision=precision, embedding_optimizer=optimizer)
    setup = make_trainer(model, enc, config, seed=0, drop_remainder=True)
    trainer, train = setup.trainer, setup.train.repeat()
    trainer.compile()
    trainer.fit(train, epochs=1, steps_per_epoch=3, verbose=0, shuffle=False)  # trace and warm up
    seconds = _median([timed_fit(trainer, train, steps) for _ in range(trials)])
    return {"model": model_name, "large": large, "optimizer": optimizer,
            "weight_optimizer": type(trainer.weight_optimizer).__name__, "table_rows": model.embedding_rows(),
            "ms_per_step": 1000 * seconds / steps, "precision": precision, "batch_size": batch_size,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def run_train(argv: list[str]) -> dict:
    """`mdmt train argv` in this process; its peak RSS and metrics (main runs it in a subprocess)."""
    from mdmt_tf.cli import main as mdmt

    code = mdmt(argv)
    if code:
        raise RuntimeError(f"mdmt train exited with {code}")
    out = argv[argv.index("--out") + 1]
    with open(f"{out}/metrics.json") as handle:
        metrics = json.load(handle)
    return {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "examples_per_second": metrics["train_examples_per_second"], "train_seconds": metrics["train_seconds"],
            "train_rows": metrics["data"]["rows"]["train"], "test_mean_auc": metrics["test"]["mean_auc"]}


def shards_for(rows: int, root: str) -> str:
    """The sharded synthetic dataset of `rows` rows under `root`, written once."""
    from pathlib import Path

    directory = Path(root) / f"shards-{rows}"
    if not (directory / "spec.yaml").exists():
        print(f"[bench] writing {rows:,} synthetic rows as shards under {directory} ...", flush=True)
        proc = subprocess.run([sys.executable, "-m", "mdmt_tf", "data", "synthetic", "--rows", str(rows), "--format",
                               "tfrecord", "--shards", "8", "--out", str(directory)], capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            raise RuntimeError(f"writing {rows} rows failed")
    return str(directory)


def rows_bench(row_counts, root: str, in_memory_max: int = 1_000_000, batch_size: int = 2048) -> dict:
    """{"rows": [streaming figures per row count], "in_memory": [...]} (see the module doc)."""
    import tempfile

    from mdmt_tf.report.tables import markdown_table

    streamed, in_memory, table = [], [], []
    for rows in row_counts:
        directory = shards_for(rows, root)
        runs = [("streamed", f"shards:{directory}")] + ([("in memory", f"synthetic:{rows}")]
                                                        if rows <= in_memory_max else [])
        for kind, data in runs:
            print(f"[bench] mdmt train --model mmoe --epochs 1 --data {data} ...", flush=True)
            with tempfile.TemporaryDirectory() as out:
                argv = ["train", "--model", "mmoe", "--data", data, "--epochs", "1", "--batch-size", str(batch_size),
                        "--out", out]
                result = {"rows": rows, **_subprocess(f"run_train({argv!r})", "run_train")}
            (streamed if kind == "streamed" else in_memory).append(result)
            table.append([kind, f"{rows:,}", f"{result['peak_rss_mib']:,.0f}", f"{result['examples_per_second']:,.0f}",
                          f"{result['test_mean_auc']:.4f}"])
    print(markdown_table(["input", "rows", "peak RSS MiB", "train examples/s", "test mean AUC"], table))
    if streamed:
        first, last = streamed[0], streamed[-1]
        print(f"peak RSS at {last['rows']:,} rows: {last['peak_rss_mib'] / first['peak_rss_mib']:.2f}x the RSS at "
              f"{first['rows']:,} (target <= 1.3x)")
        memory = {r["rows"]: r for r in in_memory}
        for r in streamed:
            if r["rows"] in memory:
                ratio = r["examples_per_second"] / memory[r["rows"]]["examples_per_second"]
                print(f"{r['rows']:,} rows: streaming trains at {ratio:.0%} of the in-memory path's examples/s")
    return {"rows": streamed, "in_memory": in_memory}


def _subprocess(call: str, function: str = "run_vocab") -> dict:
    proc = subprocess.run([sys.executable, "-c", f"import json; from mdmt_tf.bench.scale import {function};"
                           f"print('RESULT', json.dumps({call}))"], capture_output=True, text=True)
    line = next((out for out in proc.stdout.splitlines() if out.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        print(proc.stderr[-3000:], file=sys.stderr)
        raise RuntimeError(f"benchmark {call} failed")
    return json.loads(line[len("RESULT "):])


PIPELINE_BEAM_ARGS = ("--direct_running_mode=multi_processing", "--direct_num_workers=2")


def pipeline_bench(rows: int) -> dict:
    """The local pipeline at `rows` rows: {"rows", "seconds", "peak_rss_mib", "components"}."""
    from mdmt_tf._project import project_module

    result = project_module("pipeline.bench").run(rows=rows, model="mmoe", epochs=1, beam_args=PIPELINE_BEAM_ARGS)
    return {key: result[key] for key in ("rows", "seconds", "peak_rss_mib", "components", "beam_args")}


def main(models=MODELS, batch_size: int = 2048, steps: int = 10, trials: int = 3, dense_adam: bool = True,
         row_counts=(), root: str = "runs/bench-scale", pipeline_rows: int = 0) -> dict:
    """Measure, print tables, return {"vocab": {model: {...}}, "rows": [...], "in_memory": [...],
    "pipeline": None}; no model or no row count skips that part."""
    from mdmt_tf.report.tables import markdown_table

    result: dict = {"vocab": {}, "rows": [], "in_memory": [], "pipeline": None}
    if row_counts:
        result.update(rows_bench(row_counts, root, batch_size=batch_size))
    if pipeline_rows:
        result["pipeline"] = pipeline_bench(pipeline_rows)
    if not models:
        return result
    vocab, rows = result["vocab"], []
    for name in models:
        runs = {}
        plan = [("small", False, "auto"), ("large", True, "auto")] + ([("dense_adam", True, "adam")]
                                                                      if dense_adam else [])
        for key, large, optimizer in plan:
            print(f"[bench] {name}: {key} vocabulary, --embedding-optimizer {optimizer} "
                  f"({trials} x {steps} steps, batch {batch_size}) ...", flush=True)
            runs[key] = _subprocess(f"run_vocab({name!r}, {large}, {optimizer!r}, {batch_size}, {steps}, {trials})")
        small, large = runs["small"]["ms_per_step"], runs["large"]["ms_per_step"]
        vocab[name] = {"small_ms_per_step": small, "large_ms_per_step": large, "slowdown": large / small,
                       "small_table_rows": runs["small"]["table_rows"], "large_table_rows": runs["large"]["table_rows"],
                       "large_optimizer": runs["large"]["weight_optimizer"],
                       "large_peak_rss_mib": runs["large"]["peak_rss_mib"]}
        if "dense_adam" in runs:
            vocab[name]["large_dense_adam_ms_per_step"] = runs["dense_adam"]["ms_per_step"]
        rows.append([name, f"{runs['small']['table_rows']:,}", f"{small:.1f}", f"{runs['large']['table_rows']:,}",
                     f"{large:.1f} ({runs['large']['weight_optimizer']})", f"{large / small:.2f}x",
                     f"{runs['dense_adam']['ms_per_step']:.0f}" if "dense_adam" in runs else "-",
                     f"{runs['large']['peak_rss_mib']:,.0f}"])
    print(markdown_table(["model", "small: table rows", "ms/step", "large: table rows", "ms/step", "slowdown",
                          "large, Keras Adam: ms/step", "large: peak RSS MiB"], rows))
    print(f"median over {trials} x {steps} steps at steady state, batch {batch_size}; large = 10M users + 1M "
          "items. target: slowdown <= 1.5x")
    return result
