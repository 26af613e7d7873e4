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
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sampler = _TreeRSS(child.pid)
    sampler.start()
    stdout, stderr = child.communicate()
    sampler.stop()
    proc = subprocess.CompletedProcess(command, child.returncode, stdout, stderr)
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
    if sampler.peak_mib:
        print(f"peak RSS of the whole process tree (Beam workers included, sampled every 0.5 s): "
              f"{sampler.peak_mib / 1024:.2f} GiB")
    result = {"rows": rows, "model": model, "seconds": seconds, "peak_rss_gib": peak_gib,
              "peak_rss_mib": max(peak_gib * 1024, sampler.peak_mib), "largest_process_rss_mib": peak_gib * 1024,
              "process_tree_peak_rss_mib": sampler.peak_mib, "components": times, "beam_args": list(beam_args)}
    if not keep and root is None:
        shutil.rmtree(work, ignore_errors=True)
    return result


class _TreeRSS:
    """The peak summed RSS of a process and its descendants, sampled from /proc every 0.5 s
    (Linux; 0 elsewhere): Beam's multi-processing workers are separate processes, which a
    child's ru_maxrss does not add up."""

    def __init__(self, pid: int, every: float = 0.5):
        import threading

        self.pid, self.every, self.peak_mib = pid, every, 0.0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        if Path("/proc").is_dir():
            self._thread.start()

    def stop(self) -> None:
        self._done.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        while not self._done.wait(self.every):
            self.peak_mib = max(self.peak_mib, sum(_rss_kib(p) for p in _tree(self.pid)) / 1024)


def _tree(pid: int) -> list[int]:
    pids, todo = [], [pid]
    while todo:
        current = todo.pop()
        pids.append(current)
        for task in Path(f"/proc/{current}/task").glob("*/children"):
            try:
                todo.extend(int(c) for c in task.read_text().split())
            except OSError:
                continue
    return pids


def _rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0
