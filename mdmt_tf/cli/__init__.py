"""`mdmt`: the command line of mdmt_tf (one module per verb family).

Each verb parses its flags, calls the library and prints. User errors (MdmtError: a bad
spec, data file or flag) end with one line `mdmt: error: ...` and exit status 2.
"""
from __future__ import annotations

import argparse
import os
import sys

from mdmt_tf.cli import bench, data, pipeline, train
from mdmt_tf.errors import MdmtError

# Verbs that are planned but not built yet: name -> (what it will do, where it is planned).
PLANNED: dict[str, tuple[str, str]] = {
    "tune": ("Keras Tuner search over a model family", "issue #7"),
    "serve": ("local TF Serving stand-in (REST + gRPC) for development", "issue #6"),
    "predict": ("score a CSV/TFRecord with a server or a SavedModel", "issue #6"),
}


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

    for module in (data, train, pipeline, bench):
        module.add_parsers(verbs)

    for verb, (what, where) in PLANNED.items():
        p = verbs.add_parser(verb, help=f"{what} [not built yet: {where}]")
        p.set_defaults(func=cmd_planned, accepts_any=True)
    return parser


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
