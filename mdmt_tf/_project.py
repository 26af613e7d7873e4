"""The project's `pipeline`, `serving` and `components` packages, wherever they are.

In a checkout they are top-level packages beside `mdmt_tf/` (code runs with PYTHONPATH set
to the checkout, as `make` and `bin/mdmt` do). `pip install .` installs them inside this
package, as `mdmt_tf.pipeline`, `mdmt_tf.serving` and `mdmt_tf.components` (setup.py), so
that no generic top-level name is claimed in site-packages. Code of `mdmt_tf` that needs
them imports them through `project_module`; inside those packages imports are relative.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
from types import ModuleType

PACKAGES = ("pipeline", "serving", "components")


@functools.cache
def _prefix(package: str) -> str:
    """"mdmt_tf." when `package` is installed inside mdmt_tf (pip install), else "" (a checkout)."""
    return "mdmt_tf." if importlib.util.find_spec(f"mdmt_tf.{package}") is not None else ""


def project_module(name: str) -> ModuleType:
    """Import `name` ("serving.client", "pipeline.config", ...) from wherever the project's
    packages are: `mdmt_tf.<name>` when installed, `<name>` in a checkout."""
    package = name.split(".")[0]
    if package not in PACKAGES:
        raise ValueError(f"{name!r} is not in one of the project's packages {PACKAGES}")
    return importlib.import_module(_prefix(package) + name)
