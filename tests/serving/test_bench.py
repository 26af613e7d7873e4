"""`mdmt bench serve` registers on a bench sub-parser and measures all three paths."""
from __future__ import annotations

import argparse
import json
import time

import pytest

FIGURES = {"throughput_1024", "p50_ms_1", "p99_ms_1", "p50_ms_64", "p99_ms_64"}
ROWS = {"in-process", "dev server rest", "dev server grpc"}
HEADER = ["serving_default", "examples/s @1024", "p50 ms @1", "p99 ms @1", "p50 ms @64", "p99 ms @64"]


def _parser():
    from mdmt_tf.bench import serve

    parser = argparse.ArgumentParser(prog="mdmt bench")
    serve.add_parser(parser.add_subparsers(dest="bench_verb", required=True))
    return parser


def test_add_parser_adds_serve_to_bench():
    from mdmt_tf.bench import serve

    args = _parser().parse_args(["serve", "--model-dir", "m", "--requests", "7", "--in-process-only"])
    assert args.func is serve.cmd_bench_serve and args.requests == 7 and args.in_process_only


def check_figures(figures: dict) -> None:
    assert set(figures) == FIGURES
    for batch in (1, 64):
        assert 0 < figures[f"p50_ms_{batch}"] <= figures[f"p99_ms_{batch}"], (batch, figures)
    assert figures["throughput_1024"] > 0


def test_measure_uses_each_batch_size_for_its_figure():
    """A fake signature whose latency is 1 ms + 0.05 ms per example: each figure must come
    from its own batch size (1, 64, 1024), since sleep never returns early."""
    from mdmt_tf.bench.serve import measure

    sizes = []

    def call(batch):
        sizes.append(len(batch))
        time.sleep(0.001 + 0.00005 * len(batch))

    figures = measure(call, [b"x"] * 1024, requests=5, trials=2)
    check_figures(figures)
    assert set(sizes) == {1, 64, 1024}
    assert figures["p50_ms_1"] >= 1.0 and figures["p50_ms_64"] >= 1.0 + 0.05 * 64
    assert figures["p50_ms_64"] > figures["p50_ms_1"]
    assert figures["throughput_1024"] <= 1024 / (0.001 + 0.00005 * 1024)  # at most the fake's speed


def test_report_table_and_verdict():
    from mdmt_tf.bench.serve import _report

    fast = {"throughput_1024": 80_000.0, "p50_ms_1": 1.25, "p99_ms_1": 2.5, "p50_ms_64": 3.0, "p99_ms_64": 4.75}
    slow = {"throughput_1024": 900.0, "p50_ms_1": 9.0, "p99_ms_1": 12.0, "p50_ms_64": 20.0, "p99_ms_64": 31.0}
    text = _report({"in-process": fast, "dev server rest": slow, "dev server grpc": slow})
    table = parse_table(text)
    assert table["in-process"] == ["80,000", "1.25", "2.50", "3.00", "4.75"]
    assert table["dev server rest"] == table["dev server grpc"] == ["900", "9.00", "12.00", "20.00", "31.00"]
    assert "examples/s at batch 1024: met" in text and "p50 <= 5.0 ms at batch 1: met" in text
    missed = _report({"in-process": slow})
    assert "examples/s at batch 1024: MISSED" in missed and "at batch 1: MISSED" in missed


def parse_table(text: str) -> dict[str, list[str]]:
    """The markdown table of the report: {row name: cells}; checks the header."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    assert cells[0] == HEADER
    return {row[0]: row[1:] for row in cells[2:]}


@pytest.mark.slow
def test_bench_serve_runs(models, capsys, tmp_path):
    """The CLI entry point end to end: every row has every figure, printed and in --json."""
    out_json = tmp_path / "bench.json"
    args = _parser().parse_args(["serve", "--model-dir", str(models[1]), "--requests", "5", "--trials", "1",
                                 "--json", str(out_json)])
    assert args.func(args) == 0
    results = json.loads(out_json.read_text())
    assert set(results) == ROWS
    for figures in results.values():
        check_figures(figures)
    out = capsys.readouterr().out
    table = parse_table(out)
    assert set(table) == ROWS
    for where, figures in results.items():
        assert table[where] == [f"{figures['throughput_1024']:,.0f}"] + [
            f"{figures[k]:.2f}" for k in ("p50_ms_1", "p99_ms_1", "p50_ms_64", "p99_ms_64")]
    assert "targets (in-process)" in out
