"""`mdmt bench pipeline`: the local pipeline on N synthetic rows (default 100,000), timed.

Runs `mdmt pipeline run` in a child process (so its peak RSS can be read), then prints the
wall time of each component from ML Metadata, the whole run, and the peak RSS. Targets
(issue #5): <= 5 min end to end and <= 4 GiB on a 2-core machine.
"""
from __future__ import annotations

import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET_SECONDS, TARGET_GIB = 300, 4.0


def run(rows: int = 100_000, model: str = "m3oe", epochs: int | None = None, root: str | None = None,
        keep: bool = False, beam_args: tuple[str, ...] = ()) -> dict:
    """beam_args: extra Beam arguments (e.g. --direct_running_mode=multi_processing)."""
    from mdmt_tf.report.tables import markdown_table

    from .results import component_seconds, store_for

    work = Path(root or tempfile.mkdtemp(prefix="mdmt-bench-pipeline-"))
    command = [sys.executable, "-m", "mdmt_tf", "pipeline", "run", "--root", str(work),
               "--data", f"synthetic:{rows}", "--model", model]
    if epochs is not None:
        command += ["--epochs", str(epochs)]
    command += [f"--beam-arg={arg}" for arg in beam_args]
    print(f"[bench] {' '.join(command[1:])}", flush=True)
    start = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        print(proc.stderr[-4000:], file=sys.stderr)
        raise RuntimeError(f"the pipeline failed (exit {proc.returncode})")
    peak_gib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024 ** 2
    times = component_seconds(store_for(str(work / "metadata.sqlite")))
    rows_out = [[name.rsplit(".", 1)[-1], f"{s:.1f}"] for name, s in times.items()]
    print(markdown_table(["component", "seconds"], rows_out))
    met = "met" if seconds <= TARGET_SECONDS else "MISSED"
    print(f"whole run: {seconds:.0f} s (target <= {TARGET_SECONDS} s: {met}); "
          f"peak RSS {peak_gib:.2f} GiB (target <= {TARGET_GIB} GiB: {'met' if peak_gib <= TARGET_GIB else 'MISSED'}); "
          f"{rows:,} rows, model {model}")
    summary_lines = [line for line in proc.stdout.splitlines() if line.startswith("|") or "blessed" in line]
    print("\n".join(summary_lines))
    result = {"rows": rows, "model": model, "seconds": seconds, "peak_rss_gib": peak_gib,
              "peak_rss_mib": peak_gib * 1024, "components": times, "beam_args": list(beam_args)}
    if not keep and root is None:
        shutil.rmtree(work, ignore_errors=True)
    return result
