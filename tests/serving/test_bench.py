"""`mdmt bench serve` registers on a bench sub-parser and measures all three paths."""
from __future__ import annotations

import argparse

import pytest


def test_add_parser_adds_serve_to_bench():
    from mdmt_tf.bench import serve

    parser = argparse.ArgumentParser(prog="mdmt bench")
    serve.add_parser(parser.add_subparsers(dest="bench_verb", required=True))
    args = parser.parse_args(["serve", "--model-dir", "m", "--requests", "7", "--in-process-only"])
    assert args.func is serve.cmd_bench_serve and args.requests == 7 and args.in_process_only


@pytest.mark.slow
def test_bench_serve_runs(models, capsys):
    from mdmt_tf.bench.serve import run

    results = run(str(models[1]), requests=5, trials=1)
    assert set(results) == {"in-process", "dev server rest", "dev server grpc"}
    for figures in results.values():
        assert figures["throughput_1024"] > 0 and 0 < figures["p50_ms_1"] <= figures["p99_ms_1"]
    out = capsys.readouterr().out
    assert "examples/s @1024" in out and "targets (in-process)" in out
