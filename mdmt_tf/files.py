"""JSON files a run depends on (run_config.json, state.json, metrics.json), written
atomically and read with an error that names the file."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from mdmt_tf.errors import ConfigError


def write_json(path: str | Path, value: Any) -> None:
    """Write `value` as JSON to `path` atomically: into a temporary file beside it, flushed to
    disk, then renamed over it, so a reader (or a rerun after a crash) never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(json.dumps(value, indent=1))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_json(path: str | Path) -> Any:
    """The JSON in `path`; a file that is not valid JSON (truncated, edited by hand) is a
    ConfigError naming it and the fix."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path} is not valid JSON ({err}); restore it, or delete the run directory "
                          f"{path.parent} to start the run afresh") from None
