"""`mdmt tune`: Keras Tuner search (standalone, resumable, optionally distributed)."""
from __future__ import annotations

import argparse
import os

from mdmt_tf.cli.data import add_data_flags
from mdmt_tf.cli.train import _key_values, load_data, streamed_data
from mdmt_tf.training.options import PRECISIONS


def cmd_tune(args) -> int:
    from mdmt_tf.training.config import TrainConfig
    from mdmt_tf.training.encoded import EncodedData
    from mdmt_tf.tuning.search import distributed_environment, hyperband_schedule, run_search

    if args.distributed:
        os.environ.update(distributed_environment(args.distributed, args.oracle_ip, args.oracle_port,
                                                  args.tuner_id))
    given = {"batch_size": args.batch_size, "precision": args.precision}
    config = TrainConfig.from_dict({"epochs": args.epochs, "patience": args.patience, "seed": args.seed,
                                    **{k: v for k, v in given.items() if v is not None}})
    if args.tuner == "hyperband":
        schedule = hyperband_schedule(args.epochs)
        capped = args.max_trials is not None and args.max_trials < schedule
        print(f"hyperband: {schedule} trials for --epochs {args.epochs} (max epochs per trial, factor 3)"
              + (f"; --max-trials {args.max_trials} stops it after {args.max_trials}" if capped else ""))
    # --data shards:DIR is streamed (one scan, then tf.data per trial); other sources are loaded
    encoded = streamed_data(args, config.min_count) or EncodedData.from_data(load_data(args, config.min_count))
    best = run_search(args.model, encoded, config, args.out, kind=args.tuner, max_trials=args.max_trials,
                      seed=args.seed, fixed=_key_values(args.fix, "--fix"), overwrite=args.overwrite,
                      verbose=1 if args.verbose else 0)
    if best is None:
        from mdmt_tf.tuning.search import trial_owners

        ran = [t for t, owners in trial_owners(args.out).items() if args.tuner_id in owners]
        print(f"worker {args.tuner_id}: done (ran trials: {', '.join(ran) or 'none'})")
        return 0
    print((open(os.path.join(args.out, "trials.md")).read()))
    print(f"best val_mean_auc {best['objective']['value']:.4f} (trial {best['objective']['trial']}): "
          f"{best['params']} {best['train']}")
    print(f"wrote {args.out}/best_hparams.yaml (use: mdmt train --hparams {args.out}/best_hparams.yaml ...), "
          f"trials.csv, trials.md, objective.png")
    return 0


def add_parsers(verbs) -> None:
    p = verbs.add_parser("tune", help="Keras Tuner search over a model family (objective val_mean_auc)",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True)
    add_data_flags(p)
    p.add_argument("--out", required=True, help="search directory; rerunning continues the search")
    p.add_argument("--tuner", default="random", choices=("random", "bayesian", "hyperband"),
                   help="random; bayesian (Gaussian process after a random third of the trials); hyperband "
                        "(successive halving: one iteration of brackets, max epochs = --epochs, factor 3)")
    p.add_argument("--max-trials", type=int, default=None,
                   help="random / bayesian: the number of trials. hyperband: its schedule sets the number of "
                        "trials from --epochs (2 epochs: 2 trials, 3: 6, 5: 10, 10: 30); --max-trials caps it, "
                        "stopping the search after N trials even inside a bracket (default: %(default)s = 10 "
                        "trials for random / bayesian, the whole schedule for hyperband)")
    p.add_argument("--epochs", type=int, default=10, help="epochs per trial (early stopping on val_mean_auc; shorter "
                                                           "than mdmt train's, to afford more trials); hyperband: "
                                                           "the most epochs a trial trains")
    p.add_argument("--batch-size", type=int, default=None, help="default: mdmt train's")
    p.add_argument("--patience", type=int, default=2, help="a trial's early-stopping patience")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precision", default=None, choices=PRECISIONS, help="default: mdmt train's")
    p.add_argument("--fix", action="append", metavar="NAME=VALUE", help="pin a hyper-parameter of the space")
    p.add_argument("--overwrite", action="store_true", help="start the search afresh")
    p.add_argument("--verbose", action="store_true")
    p.add_argument("--distributed", choices=("chief", "worker"), default=None,
                   help="Keras Tuner distributed mode: the chief serves the oracle, workers run trials")
    p.add_argument("--oracle-ip", default="127.0.0.1")
    p.add_argument("--oracle-port", type=int, default=8000)
    p.add_argument("--tuner-id", default=None, help="a worker's id (tuner0, tuner1, ...)")
    p.set_defaults(func=cmd_tune)
