"""`mdmt bench train`: training and inference throughput, matrix-product FLOP/s against the
CPU's measured peak, and peak RSS, for M3oE (default sizes) and MMoE on the synthetic data.

Each configuration runs in its own process (so its peak RSS is its own): build the model
and the real trainer (MDMTTrainer, the configured arch mode), feed the cached, prefetched
tf.data pipeline, warm up, then time `trials` Keras fits and `trials` runs of `steps`
forward passes at the same batch size. Training is timed at steady state: each fit runs
WARMUP_STEPS + `steps` steps and the clock runs from the end of its last warm-up step to
the end of its last step, so Keras' per-fit start-up (callbacks, iterator creation,
~0.1-0.3 s) is not charged to the steps. The precision follows `mdmt train` ('auto':
mixed_bfloat16 where the CPU has native bf16). This VM's throughput varies by 10-20 % from
run to run, so the median over trials is reported (and the best).
"""
from __future__ import annotations

import json
import resource
import subprocess
import sys
import time

# name -> (model, model params, trainer settings)
CONFIGS = {
    "m3oe/joint": ("m3oe", {}, {"arch_mode": "joint"}),  # mdmt train's default
    "m3oe/bilevel": ("m3oe", {}, {"arch_mode": "bilevel", "arch_period": 1}),
    "m3oe/bilevel-p10": ("m3oe", {}, {"arch_mode": "bilevel", "arch_period": 10}),
    "m3oe/authors": ("m3oe", {}, {"arch_mode": "authors"}),
    "mmoe": ("mmoe", {}, {"arch_mode": "fixed"}),
}
WARMUP_STEPS = 3  # per timed fit, not timed
REFERENCE = {"train": 23_000, "infer": 99_000}  # the authors' PyTorch M3oE, 2 threads, batch 2048 (issue #4)
BF16_EXPORT = "infer_bf16_export_examples_per_second"  # the forward with weights stored in bf16, mixed precision only


def timed_fit(trainer, data, steps: int, warmup: int = WARMUP_STEPS) -> float:
    """Seconds `steps` training steps take at steady state: one fit of warmup + steps steps,
    clocked from the end of the last warm-up step to the end of the last step."""
    import keras

    if warmup < 1 or steps < 1:
        raise ValueError(f"timed_fit: warmup and steps must be >= 1, received warmup={warmup}, steps={steps}")
    stamps = []
    clock = keras.callbacks.LambdaCallback(on_train_batch_end=lambda batch, logs: stamps.append(time.perf_counter()))
    trainer.fit(data, epochs=1, steps_per_epoch=warmup + steps, verbose=0, shuffle=False, callbacks=[clock])
    return stamps[-1] - stamps[warmup - 1]


def measure_peak(dtype: str = "float32", n: int = 2048, reps: int = 10) -> float:
    """FLOP/s of a large square matmul: the practical peak of this CPU for TF."""
    import tensorflow as tf

    a = tf.cast(tf.random.normal((n, n)), dtype)
    b = tf.cast(tf.random.normal((n, n)), dtype)
    f = tf.function(lambda a, b: tf.matmul(a, b))
    f(a, b).numpy()
    start = time.perf_counter()
    for _ in range(reps):
        c = f(a, b)
    c.numpy()
    return 2 * n ** 3 * reps / (time.perf_counter() - start)


def _median(values):
    return sorted(values)[len(values) // 2]


def run_one(name: str, batch_size: int, steps: int, precision: str, jit: bool, trials: int = 5) -> dict:
    """One configuration's figures (`main` runs each in a subprocess)."""
    import keras
    import numpy as np
    import tensorflow as tf

    from mdmt_tf.bench.flops import graph_matmul_flops
    from mdmt_tf.data.dataset import MDMTData
    from mdmt_tf.data.sources import load_source
    from mdmt_tf.models import build_model
    from mdmt_tf.training.config import TrainConfig
    from mdmt_tf.training.encoded import EncodedData
    from mdmt_tf.training.factory import make_trainer
    from mdmt_tf.training.runtime import resolve_precision

    precision = resolve_precision(precision)
    keras.utils.set_random_seed(0)
    model_name, params, settings = CONFIGS[name]
    enc = EncodedData.from_data(MDMTData.build(*load_source("synthetic")))
    model = build_model(model_name, enc.schema, params, dtype=precision)
    config = TrainConfig(batch_size=batch_size, precision=precision, jit_compile=jit, **settings)
    # the trainer `mdmt train` builds (held-out architecture batches included), on full batches only
    setup = make_trainer(model, enc, config, seed=0, drop_remainder=True)
    trainer, train = setup.trainer, setup.train.repeat()
    trainer.compile()
    trainer.fit(train, epochs=1, steps_per_epoch=5, verbose=0, shuffle=False)  # trace and warm up
    train_times = []
    for _ in range(trials):
        train_times.append(timed_fit(trainer, train, steps))

    features, labels = next(iter(train))
    forward = tf.function(lambda x: model(x, training=False), jit_compile=jit)
    forwards = {"infer": forward}
    if precision == "mixed_bfloat16":  # what `--serving-precision bfloat16` exports: weights stored in bf16
        served = model.copy_under("bfloat16")
        forwards["bf16_export"] = tf.function(lambda x: served(x, training=False), jit_compile=jit)
    infer_times = {key: [] for key in forwards}
    for call in forwards.values():
        call(features)
    for _ in range(trials):  # interleaved, so the VM's drift hits both alike
        for key, call in forwards.items():
            start = time.perf_counter()
            for _ in range(steps):
                out = call(features)
            np.asarray(out[enc.spec.tasks[0]])
            infer_times[key].append(time.perf_counter() - start)
    train_seconds, infer_seconds = _median(train_times), _median(infer_times["infer"])

    weight_step = tf.function(trainer._weight_step_impl).get_concrete_function(features, labels)
    step_flops = graph_matmul_flops(weight_step.graph)
    arch_flops = 0
    if trainer.searching:
        arch_flops = graph_matmul_flops(tf.function(trainer._arch_step_impl).get_concrete_function(
            features, labels).graph)
        arch_flops = arch_flops / (settings.get("arch_period", 1) if settings["arch_mode"] == "bilevel"
                                   else trainer.steps_per_epoch)
    forward_flops = graph_matmul_flops(forward.get_concrete_function(features).graph)
    train_rate = steps * batch_size / train_seconds
    result = {"name": name, "batch_size": batch_size, "precision": precision, "jit": jit,
              "train_examples_per_second": train_rate,
              "infer_examples_per_second": steps * batch_size / infer_seconds,
              "train_examples_per_second_best": steps * batch_size / min(train_times),
              "infer_examples_per_second_best": steps * batch_size / min(infer_times["infer"]), "trials": trials,
              "train_flops_per_step": step_flops + arch_flops, "forward_flops_per_batch": forward_flops,
              "train_flops_per_second": (step_flops + arch_flops) * steps / train_seconds,
              "infer_flops_per_second": forward_flops * steps / infer_seconds,
              "params": int(sum(np.prod(v.shape) for v in model.trainable_variables)),
              "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if "bf16_export" in infer_times:
        result[BF16_EXPORT] = steps * batch_size / _median(infer_times["bf16_export"])
    return result


def main(names, batch_size: int = 2048, steps: int = 20, precision: str = "auto", jit: bool = False,
         trials: int = 5) -> list[dict]:
    """Run each configuration in a subprocess and print a table; returns the results."""
    from mdmt_tf.report.tables import markdown_table

    peak = {"float32": None, "bfloat16": None}
    probe = subprocess.run([sys.executable, "-c", "from mdmt_tf.bench.train import measure_peak as m;"
                            "print(m('float32'), m('bfloat16'))"], capture_output=True, text=True)
    if probe.returncode == 0:
        peak["float32"], peak["bfloat16"] = (float(v) for v in probe.stdout.split()[-2:])
    results = []
    for name in names:
        print(f"[bench] {name} (batch {batch_size}, {trials} x {steps} steps, precision {precision}"
              f"{', XLA' if jit else ''}) ...", flush=True)
        call = f"run_one({name!r}, {batch_size}, {steps}, {precision!r}, {jit}, {trials})"
        proc = subprocess.run([sys.executable, "-c", "import json, sys; from mdmt_tf.bench.train import run_one;"
                               f"print('RESULT', json.dumps({call}))"], capture_output=True, text=True)
        line = next((out for out in proc.stdout.splitlines() if out.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            print(proc.stderr[-3000:], file=sys.stderr)
            raise RuntimeError(f"benchmark {name} failed")
        results.append(json.loads(line[len("RESULT "):]))
    reference_peak = peak["bfloat16" if results and results[0]["precision"] == "mixed_bfloat16" else "float32"]
    rows = []
    for r in results:
        rows.append([r["name"], f"{r['train_examples_per_second']:,.0f} ({r['train_examples_per_second_best']:,.0f})",
                     f"{r['infer_examples_per_second']:,.0f} ({r['infer_examples_per_second_best']:,.0f})",
                     f"{r['train_flops_per_step'] / 1e9:.2f}",
                     f"{r['train_flops_per_second'] / 1e9:.0f}",
                     f"{r['train_flops_per_second'] / reference_peak:.0%}" if reference_peak else "n/a",
                     f"{r['infer_flops_per_second'] / 1e9:.0f}", f"{r['peak_rss_mib']:,.0f}"])
        if BF16_EXPORT in r:
            rows[-1].insert(3, f"{r[BF16_EXPORT]:,.0f}")
    bf16_weights = bool(results) and BF16_EXPORT in results[0]
    print(markdown_table(["config", "train ex/s (best)", "infer ex/s (best)"]
                         + (["infer ex/s, bf16 export"] if bf16_weights else [])
                         + ["train GFLOP/step", "train GFLOP/s", "of peak", "infer GFLOP/s", "peak RSS MiB"], rows))
    if bf16_weights:
        print("infer, bf16 export: the same forward with the weights stored in bfloat16, as "
              "`mdmt train --serving-precision bfloat16` exports it (no per-call weight casts).")
    if reference_peak:
        print(f"ex/s: median over trials (best in parentheses), training at steady state (after "
              f"{WARMUP_STEPS} untimed steps per fit); GFLOP/s from the medians; precision "
              f"{results[0]['precision'] if results else precision}.")
        print(f"peak: a 2048^3 matmul reaches {peak['float32'] / 1e9:.0f} GFLOP/s float32 and "
              f"{peak['bfloat16'] / 1e9:.0f} GFLOP/s bfloat16 here; FLOPs count matrix products only.")
    for r in results:
        if r["name"].startswith("m3oe"):
            print(f"{r['name']}: {r['train_examples_per_second'] / REFERENCE['train']:.2f}x the authors' PyTorch "
                  f"training ({REFERENCE['train']:,}/s), {r['infer_examples_per_second'] / REFERENCE['infer']:.2f}x "
                  f"its inference ({REFERENCE['infer']:,}/s)"
                  + (f", {r[BF16_EXPORT] / REFERENCE['infer']:.2f}x with the bf16 export" if BF16_EXPORT in r else ""))
    return results
