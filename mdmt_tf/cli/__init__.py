"""`mdmt`: the command line of mdmt_tf (one module per verb family).

Each verb parses its flags, calls the library and prints. User errors (MdmtError: a bad
spec, data file or flag) end with one line `mdmt: error: ...` and exit status 2.
"""
from __future__ import annotations

import argparse
import os
import sys

from mdmt_tf.cli import bench, data, pipeline, serve, train, tune
from mdmt_tf.errors import MdmtError
from mdmt_tf.log import configure_cli_logging


# ------------------------------------------------------------------------ parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mdmt", description="mdmt_tf: multi-domain multi-task recommendation on TensorFlow/Keras + TFX.")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)

    for module in (data, train, tune, pipeline, serve, bench):
        module.add_parsers(verbs)

    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TF's C++ INFO lines out of the CLI
    configure_cli_logging()
    parser = build_parser()
    args = parser.parse_args(argv)
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
