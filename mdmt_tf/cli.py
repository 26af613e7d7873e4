"""`mdmt`: the command line of mdmt_tf.

Each verb parses its flags, calls the library and prints. User errors (MdmtError: a bad
spec, data file or flag) end with one line `mdmt: error: ...` and exit status 2.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from mdmt_tf.errors import MdmtError

# Verbs that are planned but not built yet: name -> (what it will do, where it is planned).
PLANNED: dict[str, tuple[str, str]] = {
    "train": ("train one model and write metrics.json, plots and a SavedModel", "issue #4"),
    "evaluate": ("recompute test metrics from a saved model", "issue #4"),
    "compare": ("run several models over seeds and tabulate AUC per (domain, task)", "issue #4"),
    "tune": ("Keras Tuner search over a model family", "issue #7"),
    "pipeline": ("run or compile the TFX pipeline (local / Kubeflow)", "issue #5"),
    "serve": ("local TF Serving stand-in (REST + gRPC) for development", "issue #6"),
    "predict": ("score a CSV/TFRecord with a server or a SavedModel", "issue #6"),
    "bench": ("benchmarks: training / pipeline / serving throughput and memory", "issues #4-#6"),
}


# ------------------------------------------------------------------------- data
def cmd_data_synthetic(args) -> int:
    from mdmt_tf.data.readers import random_split, write_csv, write_tfrecord
    from mdmt_tf.data.synthetic import SyntheticConfig, generate, synthetic_spec

    config = SyntheticConfig(rows=args.rows, domains=args.domains, seed=args.seed)
    spec = synthetic_spec(config)
    parts = random_split(generate(config), args.seed, source="synthetic")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for split, table in parts.items():
        if args.format == "csv":
            write_csv(table, out / f"{split}.csv")
        else:
            write_tfrecord(table, out / f"{split}.tfrecord.gz", spec)
    spec.to_yaml(out / "spec.yaml")
    print(f"wrote {sum(len(t) for t in parts.values())} rows ({args.format}) and spec.yaml to {out}")
    return 0


def cmd_data_ml100k(args) -> int:
    from mdmt_tf.data.movielens import ML100K_SPEC, convert_ml100k
    from mdmt_tf.report.tables import data_summary

    splits = convert_ml100k(args.src, args.out, seed=args.seed)
    print(data_summary(ML100K_SPEC, splits))
    print(f"wrote train/val/test.csv and spec.yaml to {args.out}")
    return 0


def cmd_data_describe(args) -> int:
    from mdmt_tf.data.dataset import MDMTData
    from mdmt_tf.data.sources import load_source
    from mdmt_tf.report.tables import data_summary

    spec, splits = load_source(args.data, args.spec, split_seed=args.split_seed)
    data = MDMTData.build(spec, splits)
    print(data_summary(spec, splits))
    sizes = ", ".join(f"{n}={data.vocab.size(n)}" for n in spec.sparse)
    print(f"\nvocabulary sizes (training split, OOV bucket included): {sizes}")
    return 0


# ---------------------------------------------------------------------- planned
def cmd_planned(args) -> int:
    what, where = PLANNED[args.verb]
    print(f"mdmt {args.verb}: not built yet ({what}; planned in {where}).", file=sys.stderr)
    return 2


# ------------------------------------------------------------------------ parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mdmt", description="mdmt_tf: multi-domain multi-task recommendation on TensorFlow/Keras + TFX.")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)

    data = verbs.add_parser("data", help="make, convert and describe datasets")
    data_verbs = data.add_subparsers(dest="data_verb", metavar="ACTION", required=True)
    p = data_verbs.add_parser("synthetic", help="write the synthetic MDMT dataset (train/val/test + spec.yaml)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--rows", type=int, default=60_000)
    p.add_argument("--domains", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--format", choices=("csv", "tfrecord"), default="csv")
    p.set_defaults(func=cmd_data_synthetic)
    p = data_verbs.add_parser("ml100k", help="convert MovieLens-100K (domains by age group; click, like)")
    p.add_argument("--src", required=True, help="directory with u.data, u.user, u.item, u.genre")
    p.add_argument("--out", required=True, help="output directory (never inside this repository: "
                                                "MovieLens may not be redistributed)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random 80/10/10 split")
    p.set_defaults(func=cmd_data_ml100k)
    p = data_verbs.add_parser("describe", help="rows and positive rates per split and domain")
    add_data_flags(p)
    p.set_defaults(func=cmd_data_describe)

    for verb, (what, where) in PLANNED.items():
        p = verbs.add_parser(verb, help=f"{what} [not built yet: {where}]")
        p.set_defaults(func=cmd_planned, accepts_any=True)
    return parser


def add_data_flags(p: argparse.ArgumentParser) -> None:
    from mdmt_tf.data.sources import USAGE

    p.add_argument("--data", default="synthetic", help=USAGE)
    p.add_argument("--spec", default=None, help="dataset spec YAML (default: spec.yaml next to the data)")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the 80/10/10 split of a single file")


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TF's C++ INFO lines out of the CLI
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "accepts_any", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return int(args.func(args) or 0)
    except MdmtError as err:
        print(f"mdmt: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mdmt: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
