"""The versions of one model under a TF Serving base path: load, switch, unload, report.

Like TF Serving's file-system source with the `latest N` version policy: every poll lists
the numbered directories under the base path and wants the newest N of them. It loads a
wanted version that is not loaded, then unloads what is no longer wanted, keeping the
newest N loaded versions still on disk, so a request always finds a version
(availability-preserving):

  * a new version replaces the old one once it is AVAILABLE;
  * deleting the newest version rolls back: the newest remaining one is loaded (again,
    if it was unloaded) and the deleted one unloaded once it is;
  * a version that fails to load is reported with its error (state END) while the
    previous one keeps serving, and retried on a later poll, at most `max_load_retries`
    times, `load_retry_seconds` apart (TF Serving's --max_num_load_retries and
    --load_retry_interval_micros);
  * if no version on disk can be served (the base path emptied, every load failed), the
    newest loaded one keeps serving.

Version labels map a name to a version number, as `version_labels` in a model config.

Lookups never block on loading: the set of loaded versions is an immutable dict swapped
under a lock.
"""
from __future__ import annotations

import dataclasses
import logging
import threading
import time
from pathlib import Path
from typing import Callable

from tensorflow_serving.apis import get_model_status_pb2

from .status import invalid, not_found

log = logging.getLogger("serving")

STATES = get_model_status_pb2.ModelVersionStatus.State


@dataclasses.dataclass
class VersionState:
    state: str                  # START, LOADING, AVAILABLE, UNLOADING, END
    error: str = ""             # why a load failed (state END)
    failures: int = 0           # failed loads so far (reset by a successful one)
    failed_at: float = 0.0      # time.monotonic() of the last failure


def list_versions(base_path: Path) -> list[int]:
    """Numbered version directories, ascending (temporary `.N.tmp-*` names are skipped)."""
    if not base_path.is_dir():
        return []
    return sorted(int(p.name) for p in base_path.iterdir() if p.is_dir() and p.name.isdigit())


class ModelRepository:
    """Loaded versions of model `name` from `base_path` (see the module doc)."""

    def __init__(self, name: str, base_path: str | Path, load: Callable, num_versions: int = 1,
                 labels: dict[str, int] | None = None, max_load_retries: int = 5, load_retry_seconds: float = 60.0):
        if num_versions < 1:
            raise ValueError(f"num_versions must be >= 1, got {num_versions}")
        if max_load_retries < 0 or load_retry_seconds < 0:
            raise ValueError("max_load_retries and load_retry_seconds must be >= 0")
        self.name, self.base_path, self.num_versions = name, Path(base_path), num_versions
        self.labels = dict(labels or {})
        self.max_load_retries, self.load_retry_seconds = max_load_retries, load_retry_seconds
        self._load = load
        self._lock = threading.Lock()
        self._servables: dict = {}
        self._states: dict[int, VersionState] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---------------------------------------------------------------- polling
    def poll(self) -> None:
        """One scan of the base path: load wanted versions, then unload the others."""
        on_disk = list_versions(self.base_path)
        wanted = on_disk[-self.num_versions:]
        for version in reversed(wanted):  # newest first
            if version not in self._servables and self._may_load(version):
                self._load_version(version)
        with self._lock:
            present = sorted(v for v in self._servables if v in on_disk)
            keep = set(present[-self.num_versions:])
            if not keep and self._servables:  # nothing on disk is servable: keep serving the newest loaded
                keep = {max(self._servables)}
                if max(self._servables) not in on_disk:
                    log.warning("%s version %d was deleted and no other version could be loaded; still serving it",
                                self.name, max(self._servables))
            for version in [v for v in self._servables if v not in keep]:
                self._states[version] = VersionState("END")
                log.info("unloaded %s version %d", self.name, version)
            self._servables = {v: s for v, s in self._servables.items() if v in keep}

    def _may_load(self, version: int) -> bool:
        """Never tried, unloaded earlier (a rollback), or failed and due for a retry."""
        state = self._states.get(version)
        if state is None or not state.error:
            return state is None or state.state == "END"
        if state.failures > self.max_load_retries:
            return False
        return time.monotonic() - state.failed_at >= self.load_retry_seconds

    def _load_version(self, version: int) -> None:
        previous = self._states.get(version)
        failures = previous.failures if previous is not None else 0
        self._set_state(version, VersionState("LOADING", failures=failures))
        start = time.perf_counter()
        try:
            servable = self._load(self.name, version, self.base_path / str(version))
        except Exception as err:  # any failure: report it, keep serving what we have
            message = f"{type(err).__name__}: {err}"
            failures += 1
            self._set_state(version, VersionState("END", error=message, failures=failures,
                                                  failed_at=time.monotonic()))
            left = self.max_load_retries - failures + 1
            retry = (f"; retrying in {self.load_retry_seconds:g} s ({left} retries left)"
                     if failures <= self.max_load_retries else "; no retries left")
            log.error("failed to load %s version %d from %s: %s%s", self.name, version, self.base_path, message, retry)
            return
        with self._lock:
            self._servables = {**self._servables, version: servable}
            self._states[version] = VersionState("AVAILABLE")
        log.info("loaded %s version %d in %.1f s; serving versions %s", self.name, version,
                 time.perf_counter() - start, sorted(self._servables))

    def _set_state(self, version: int, state: VersionState) -> None:
        with self._lock:
            self._states[version] = state

    def start(self, poll_seconds: float) -> None:
        """Poll now, then every `poll_seconds` in a daemon thread until stop()."""
        self.poll()

        def loop():
            while not self._stop.wait(poll_seconds):
                try:
                    self.poll()
                except Exception:  # a poll must never end the thread
                    log.exception("polling %s failed", self.base_path)

        self._thread = threading.Thread(target=loop, name=f"poll-{self.name}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    # ---------------------------------------------------------------- lookups
    def servable(self, name: str, version: int | None = None, label: str | None = None):
        """The servable a request asks for (TF Serving's messages on failure)."""
        if version is not None and label is not None:
            raise invalid(f"Both model version ({version}) and model version label ({label}) cannot be supplied.")
        if label is not None:
            if name != self.name or label not in self.labels:
                raise invalid(f"Unrecognized servable version label: {label}")
            version = self.labels[label]
        servables = self._servables
        if name != self.name or not servables:
            request = f"Specific({name}, {version})" if version is not None else f"Latest({name})"
            raise not_found(f"Servable not found for request: {request}")
        if version is None:
            return servables[max(servables)]
        if version not in servables:
            raise not_found(f"Servable not found for request: Specific({name}, {version})")
        return servables[version]

    def available_versions(self) -> list[int]:
        return sorted(self._servables)

    def status(self, name: str, version: int | None = None) -> get_model_status_pb2.GetModelStatusResponse:
        """GetModelStatusResponse: one version, or all known ones newest first."""
        with self._lock:
            states = dict(self._states) if name == self.name else {}
        if version is not None and version not in states:
            raise not_found(f"Could not find version {version} of model {name}")
        if not states:
            raise not_found(f"Could not find any versions of model {name}")
        response = get_model_status_pb2.GetModelStatusResponse()
        for v in ([version] if version is not None else sorted(states, reverse=True)):
            entry = response.model_version_status.add(version=v, state=STATES.Value(states[v].state))
            entry.status.SetInParent()
            if states[v].error:
                entry.status.error_code = 2  # UNKNOWN
                entry.status.error_message = states[v].error
        return response

