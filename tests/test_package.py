"""The mdmt_tf package as a whole: every module imports without TFX, `python -m mdmt_tf`
works, and setup.py ships every module.

Design (DEVELOPERS.md, Conventions): `mdmt_tf/` never imports tfx; the TFX code lives in
`components/` and `pipeline/`, which the CLI loads lazily. tensorflow-transform is used by
mdmt_tf.transform / mdmt_tf.training.transformed but imported inside their functions, so
only tfx is asserted absent here.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from tests.conftest import REPO

PACKAGE = REPO / "mdmt_tf"


def _modules_on_disk() -> list[str]:
    """Every module of mdmt_tf by its file, including directories without __init__.py
    (namespace packages, which pkgutil.walk_packages does not descend into)."""
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        if "__pycache__" in parts:
            continue
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names.append(".".join(parts))
    return names


def _run_python(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env,
                          timeout=600)


def _is_tfx(name: str) -> bool:
    return name == "tfx" or name.startswith("tfx.")


@pytest.fixture(scope="module")
def imported():
    """Import every module of mdmt_tf in one fresh interpreter; report what it loaded."""
    code = textwrap.dedent("""
        import importlib, json, pkgutil, sys
        import mdmt_tf
        walked = [m.name for m in pkgutil.walk_packages(mdmt_tf.__path__, "mdmt_tf.")]
        requested = json.loads(sys.argv[1]) if len(sys.argv) > 1 else []
        failed = {}
        for name in sorted(set(walked) | set(requested)):
            if name == "mdmt_tf.__main__":  # runs the CLI: covered by test_python_m_mdmt_tf_help
                continue
            try:
                importlib.import_module(name)
            except Exception as err:
                failed[name] = f"{type(err).__name__}: {err}"
        print(json.dumps({"walked": walked, "failed": failed, "modules": sorted(sys.modules)}))
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(_modules_on_disk())], capture_output=True,
                          text=True, cwd=REPO, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_every_module_imports(imported):
    assert imported["failed"] == {}
    walked = set(imported["walked"])
    # the walk found the package's regular subpackages, and every module on disk was imported
    assert {"mdmt_tf.cli", "mdmt_tf.data.movielens", "mdmt_tf.models.m3oe", "mdmt_tf.transform"} <= walked
    on_disk = set(_modules_on_disk())
    assert walked <= on_disk
    loaded = set(imported["modules"])
    assert on_disk - {"mdmt_tf.__main__"} <= loaded
    assert {"mdmt_tf.training.fit", "mdmt_tf.report.tables", "tensorflow", "keras"} <= loaded


def test_no_module_of_mdmt_tf_imports_tfx(imported):
    assert [m for m in imported["modules"] if _is_tfx(m)] == []
    # nor the project's TFX packages, which the CLI loads only for `mdmt pipeline` / `bench pipeline`
    assert {"pipeline", "components"}.isdisjoint(imported["modules"])


def test_python_m_mdmt_tf_help():
    proc = subprocess.run([sys.executable, "-m", "mdmt_tf", "--help"], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("usage: mdmt ") and "pipeline" in proc.stdout


def test_cli_start_up_does_not_load_tfx():
    """`mdmt --help` (the entry point as `python -m mdmt_tf` runs it) loads no TFX module."""
    proc = _run_python(textwrap.dedent("""
        import json, runpy, sys
        sys.argv = ["mdmt", "--help"]
        try:
            runpy.run_module("mdmt_tf", run_name="__main__", alter_sys=True)
        except SystemExit as stop:
            code = stop.code
        print(json.dumps({"code": code, "modules": sorted(sys.modules)}))
    """))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["code"] == 0
    assert "mdmt_tf.cli" in result["modules"]
    assert [m for m in result["modules"] if _is_tfx(m) or m.split(".")[0] in ("pipeline", "components")] == []


def test_setup_py_ships_every_module_directory():
    """Every directory of mdmt_tf holding modules is a package that setup.py installs."""
    proc = _run_python(textwrap.dedent("""
        import json
        import setuptools  # noqa: F401  (provides distutils on Python 3.12+ too)
        from distutils.core import run_setup
        dist = run_setup("setup.py", stop_after="init")
        print(json.dumps(sorted(dist.packages)))
    """))
    assert proc.returncode == 0, proc.stderr[-3000:]
    packages = set(json.loads(proc.stdout.strip().splitlines()[-1]))
    directories = {".".join(p.parent.relative_to(REPO).parts) for p in PACKAGE.rglob("*.py")
                   if "__pycache__" not in p.parts}
    assert "mdmt_tf.data" in packages  # the query works
    assert sorted(directories - packages) == []
