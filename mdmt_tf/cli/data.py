"""`mdmt data ...`: make, convert and describe datasets."""
from __future__ import annotations

import argparse
from pathlib import Path


def cmd_data_synthetic(args) -> int:
    from mdmt_tf.data.readers import random_split, write_csv, write_tfrecord
    from mdmt_tf.data.synthetic import SyntheticConfig, generate, synthetic_spec

    config = SyntheticConfig(rows=args.rows, domains=args.domains, seed=args.seed)
    if args.shards is not None:
        from mdmt_tf.data.shards import write_sharded_synthetic
        from mdmt_tf.errors import ConfigError

        if args.format != "tfrecord":
            raise ConfigError("--shards writes TFRecord shards: add --format tfrecord")
        counts = write_sharded_synthetic(config, args.out, args.shards, args.chunk_rows)
        print(f"wrote {sum(counts.values())} rows ({counts}) as {args.shards} gzip TFRecord shard(s) per split "
              f"and spec.yaml to {args.out}; read them with --data shards:{args.out}")
        return 0
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

    spec, splits = load_source(args.data, args.spec, split_seed=args.split_seed, split=args.split)
    data = MDMTData.build(spec, splits)
    print(data_summary(spec, splits))
    sizes = ", ".join(f"{n}={data.vocab.size(n)}" for n in spec.sparse)
    print(f"\nvocabulary sizes (training split, OOV bucket included): {sizes}")
    return 0


def add_parsers(verbs) -> None:
    data = verbs.add_parser("data", help="make, convert and describe datasets")
    data_verbs = data.add_subparsers(dest="data_verb", metavar="ACTION", required=True)
    p = data_verbs.add_parser("synthetic", help="write the synthetic MDMT dataset (train/val/test + spec.yaml)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--rows", type=int, default=60_000)
    p.add_argument("--domains", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--format", choices=("csv", "tfrecord"), default="csv")
    p.add_argument("--shards", type=int, default=None,
                   help="tfrecord: write K gzip shards per split (train-00000-of-0000K.tfrecord.gz ...), generated "
                        "in chunks with bounded memory (rows differ from the in-memory generator's, same "
                        "distribution); read them with --data shards:DIR")
    p.add_argument("--chunk-rows", type=int, default=250_000, help="rows generated at a time with --shards")
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


def add_data_flags(p: argparse.ArgumentParser) -> None:
    from mdmt_tf.data.sources import USAGE

    p.add_argument("--data", default="synthetic", help=USAGE)
    p.add_argument("--spec", default=None, help="dataset spec YAML (default: spec.yaml next to the data)")
    p.add_argument("--split", default="random", help="how a single table is split: 'random' (seeded "
                   "80/10/10) or 'temporal:COLUMN' (oldest 80%% train, next 10%% val, newest 10%% test)")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the random 80/10/10 split of a single file")


