"""`mdmt serve`, `mdmt predict` and `mdmt export`: serving from the command line.

    mdmt export  --model-dir RUN/model --base-path MODELS/mdmt [--version N]
    mdmt serve   --model-base-path MODELS/mdmt [--rest-port 8501 --grpc-port 8500]
    mdmt predict --server localhost:8501 --data FILE --out PRED.csv
    mdmt predict --model-dir RUN/model   --data FILE --out PRED.csv

`mdmt serve` runs the development stand-in for tensorflow_model_server (serving/); in
production the same base path is served by TF Serving (serving/README.md).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from mdmt_tf._project import project_module
from mdmt_tf.errors import ConfigError

STAND_IN_HELP = ("run the DEVELOPMENT STAND-IN for tensorflow_model_server (TF Serving's REST + gRPC API) on a "
                 "base path of numbered SavedModel versions; production serves with TF Serving")


def cmd_export(args) -> int:
    from mdmt_tf.export.savedmodel import publish_version, versions

    if args.version is not None and args.version < 1:
        raise ConfigError(f"--version must be >= 1, got {args.version}")
    path = publish_version(args.model_dir, args.base_path, args.version)
    print(f"published {args.model_dir} as {path} (versions now: {versions(args.base_path)})")
    return 0


def cmd_serve(args) -> int:
    devserver = project_module("serving.devserver.server")

    devserver.configure_logging(args.log_level)
    return devserver.serve_forever(devserver.options_from_args(args))


def _spec(path: str | None):
    if path is None:
        return None
    from mdmt_tf.spec import DatasetSpec

    if not Path(path).exists():
        raise ConfigError(f"--spec {path} does not exist")
    return DatasetSpec.from_yaml(path)


def cmd_predict(args) -> int:
    scoring = project_module("serving.scoring")

    if (args.server is None) == (args.model_dir is None):
        raise ConfigError("give exactly one of --server URL (a running model server) or --model-dir DIR (a SavedModel)")
    if args.batch_rows < 1:
        raise ConfigError(f"--batch-rows must be >= 1, got {args.batch_rows}")
    if args.chunk_rows < 1:
        raise ConfigError(f"--chunk-rows must be >= 1, got {args.chunk_rows}")
    spec = _spec(args.spec)
    if args.server is not None:
        ServingClient = project_module("serving.client").ServingClient

        # without --spec, the spec comes from the model's model_info signature (ServingClient.model_info)
        with ServingClient(args.server, model_name=args.model_name, protocol=args.protocol,
                           timeout=args.timeout) as client:
            spec = spec or scoring.served_spec(client)
            rows = scoring.predict_to_csv(scoring.server_scorer(client, args.batch_rows), args.data, spec, args.out,
                                          args.chunk_rows)
        source = f"{args.protocol} {args.server} model {args.model_name}"
    else:
        from mdmt_tf.export.scoring import SavedModelScorer

        scorer = SavedModelScorer(args.model_dir)
        spec = spec or scorer.spec
        rows = scoring.predict_to_csv(scorer.score, args.data, spec, args.out, args.chunk_rows)
        source = args.model_dir
    print(f"scored {rows} rows of {args.data} with {source}; wrote {args.out} (columns: {', '.join(spec.tasks)})")
    return 0


def add_parsers(verbs) -> None:
    add_server_arguments = project_module("serving.devserver.server").add_server_arguments

    p = verbs.add_parser("serve", help=STAND_IN_HELP, description=STAND_IN_HELP + ".",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_server_arguments(p)
    p.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    p.set_defaults(func=cmd_serve)

    p = verbs.add_parser("predict", help="score a CSV/TFRecord with a model server or a SavedModel; one probability "
                                         "column per task, rows in input order",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--server", default=None, help="model server address, e.g. localhost:8501 (REST) or "
                                                  "localhost:8500 with --protocol grpc")
    p.add_argument("--model-dir", default=None, help="score in-process with this SavedModel instead")
    p.add_argument("--model-name", default="mdmt", help="model name on the server")
    p.add_argument("--protocol", default="rest", choices=("rest", "grpc"))
    p.add_argument("--data", required=True, help="CSV or TFRecord file of rows to score (labels optional)")
    p.add_argument("--spec", default=None, help="dataset spec YAML; default: the served model's own "
                                                "(--server) or DIR/assets.extra/spec.yaml (--model-dir)")
    p.add_argument("--out", required=True, help="output CSV")
    p.add_argument("--batch-rows", type=int, default=1024, help="rows per request (--server)")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds per request (--server)")
    p.add_argument("--chunk-rows", type=int, default=100_000,
                   help="rows read, scored and written at a time (memory is bounded by the chunk)")
    p.set_defaults(func=cmd_predict)

    p = verbs.add_parser("export", help="publish a SavedModel as the next numbered version of a TF Serving base path "
                                        "(atomically: a polling server never sees it half-written, and concurrent "
                                        "exports into one base path each get their own version)")
    p.add_argument("--model-dir", required=True, help="a SavedModel written by mdmt train (RUN/model)")
    p.add_argument("--base-path", required=True, help="the model's base path, e.g. models/mdmt")
    p.add_argument("--version", type=int, default=None, help="version number (default: the next one)")
    p.set_defaults(func=cmd_export)
