"""`mdmt bench ...`: benchmarks that print figures and ratios."""
from __future__ import annotations

import json


def cmd_bench_train(args) -> int:
    from mdmt_tf.bench.train import CONFIGS, main

    names = list(CONFIGS) if args.configs == "all" else [c.strip() for c in args.configs.split(",")]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        from mdmt_tf.errors import ConfigError

        raise ConfigError(f"unknown benchmark config(s) {unknown}; valid: {list(CONFIGS)}")
    results = main(names, batch_size=args.batch_size, steps=args.steps, mixed=args.mixed_precision, jit=args.jit,
                   trials=args.trials)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)
    return 0


def add_parsers(verbs) -> None:
    bench = verbs.add_parser("bench", help="benchmarks: training throughput, FLOP/s, memory")
    kinds = bench.add_subparsers(dest="bench_verb", metavar="WHAT", required=True)
    from mdmt_tf.bench import serve as bench_serve

    bench_serve.add_parser(kinds)
    p = kinds.add_parser("train", help="training / inference examples/s, FLOP/s vs peak, peak RSS (M3oE, MMoE)")
    p.add_argument("--configs", default="all", help="comma-separated: m3oe/bilevel, m3oe/bilevel-p10, "
                                                    "m3oe/authors, mmoe; or 'all'")
    p.add_argument("--batch-size", type=int, default=2048)
    p.add_argument("--steps", type=int, default=20, help="steps per timed trial")
    p.add_argument("--trials", type=int, default=5, help="timed trials (the median is reported)")
    p.add_argument("--mixed-precision", action="store_true", help="mixed_bfloat16 policy")
    p.add_argument("--jit", action="store_true", help="XLA-compile the steps")
    p.add_argument("--json", default=None, help="also write the results here")
    p.set_defaults(func=cmd_bench_train)
