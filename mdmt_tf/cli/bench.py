"""`mdmt bench ...`: benchmarks that print figures and ratios."""
from __future__ import annotations

import json

from mdmt_tf._project import project_module


def cmd_bench_train(args) -> int:
    from mdmt_tf.bench.train import CONFIGS, main

    names = list(CONFIGS) if args.configs == "all" else [c.strip() for c in args.configs.split(",")]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        from mdmt_tf.errors import ConfigError

        raise ConfigError(f"unknown benchmark config(s) {unknown}; valid: {list(CONFIGS)}")
    results = main(names, batch_size=args.batch_size, steps=args.steps, precision=args.precision, jit=args.jit,
                   trials=args.trials)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)
    return 0


def cmd_bench_scale(args) -> int:
    from mdmt_tf.bench.scale import MODELS, main
    from mdmt_tf.errors import ConfigError

    models = MODELS if args.models == "all" else tuple(m.strip() for m in args.models.split(",") if m.strip())
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        raise ConfigError(f"unknown model(s) {unknown} for bench scale; valid: {list(MODELS)} or 'all'")
    try:
        row_counts = tuple(int(float(r)) for r in args.rows.split(",") if r.strip())
        pipeline_rows = int(float(args.pipeline_rows))
    except ValueError:
        raise ConfigError(f"--rows takes comma-separated row counts and --pipeline-rows one (e.g. 1e6), got "
                          f"{args.rows!r} and {args.pipeline_rows!r}") from None
    results = main(models, batch_size=args.batch_size, steps=args.steps, trials=args.trials,
                   dense_adam=not args.no_dense_adam, row_counts=row_counts, root=args.root,
                   pipeline_rows=pipeline_rows)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)
    return 0


def _add_scale_bench(kinds) -> None:
    p = kinds.add_parser("scale", help="cost of a production-size vocabulary (10M users + 1M items) per training "
                                       "step, MMoE and M3oE")
    p.add_argument("--models", default="all", help="vocab part: comma-separated mmoe, m3oe; 'all'; '' to skip it")
    p.add_argument("--rows", default="1e5,1e6,1e7",
                   help="rows part: row counts to train MMoE on, streamed from shards ('' to skip it)")
    p.add_argument("--root", default="runs/bench-scale", help="where the rows part's shards are written (kept)")
    p.add_argument("--pipeline-rows", default="0",
                   help="pipeline part: the local TFX pipeline (MMoE, 1 epoch, Beam multi-processing) on this many "
                        "synthetic rows, e.g. 1e6 (0: skip)")
    p.add_argument("--batch-size", type=int, default=2048)
    p.add_argument("--steps", type=int, default=10, help="steps per timed trial")
    p.add_argument("--trials", type=int, default=3, help="timed trials (the median is reported)")
    p.add_argument("--no-dense-adam", action="store_true",
                   help="skip timing the large tables with Keras' dense Adam (~1 s a step)")
    p.add_argument("--json", default=None, help="also write the results here")
    p.set_defaults(func=cmd_bench_scale)


def _add_pipeline_bench(kinds) -> None:
    p = kinds.add_parser("pipeline", help="time the local TFX pipeline on N synthetic rows; per-component wall "
                                          "time, whole run, peak RSS")
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--model", default="m3oe")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--root", default=None, help="keep the run here (default: a temporary directory)")
    p.add_argument("--json", default=None, help="also write the results here")
    p.set_defaults(func=_run_pipeline_bench)


def _run_pipeline_bench(args) -> int:
    run = project_module("pipeline.bench").run  # needs TFX: imported only here

    result = run(rows=args.rows, model=args.model, epochs=args.epochs, root=args.root)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1)
    return 0


def add_parsers(verbs) -> None:
    bench = verbs.add_parser("bench", help="benchmarks: training throughput, FLOP/s, memory")
    kinds = bench.add_subparsers(dest="bench_verb", metavar="WHAT", required=True)
    from mdmt_tf.bench import serve as bench_serve

    bench_serve.add_parser(kinds)
    _add_pipeline_bench(kinds)
    _add_scale_bench(kinds)
    p = kinds.add_parser("train", help="training / inference examples/s, FLOP/s vs peak, peak RSS (M3oE, MMoE)")
    p.add_argument("--configs", default="all", help="comma-separated: m3oe/joint (the default arch mode), "
                                                    "m3oe/bilevel, m3oe/bilevel-p10, m3oe/authors, mmoe; or 'all'")
    p.add_argument("--batch-size", type=int, default=2048)
    p.add_argument("--steps", type=int, default=20, help="steps per timed trial")
    p.add_argument("--trials", type=int, default=5, help="timed trials (the median is reported)")
    p.add_argument("--precision", default="auto", choices=("auto", "float32", "mixed_bfloat16"),
                   help="as for `mdmt train`: 'auto' is mixed_bfloat16 on CPUs with native bf16, else float32")
    p.add_argument("--jit", action="store_true", help="XLA-compile the steps")
    p.add_argument("--json", default=None, help="also write the results here")
    p.set_defaults(func=cmd_bench_train)
