#!/usr/bin/env bash
# Run the checks and the test suite with the venv's python: scripts/run_tests.sh PYTHON [pytest args...]
# First ruff (ruff.toml) and mypy (mypy.ini): a finding fails the run before any test.
# pytest exits 5 when it collects no tests; that is reported and treated as a pass
# (a new checkout may hold no tests yet); any other non-zero exit is a failure.
set -uo pipefail
PYTHON=$1; shift
cd "$(dirname "${BASH_SOURCE[0]}")/.."
echo "[test] ruff check" >&2
"$PYTHON" -m ruff check mdmt_tf components pipeline serving tests scripts setup.py || {
  echo "[test] ruff found the problems above (ruff.toml); fix them, or \`ruff check --fix\` the fixable ones" >&2
  exit 1
}
echo "[test] mypy" >&2
"$PYTHON" -m mypy || { echo "[test] mypy found the problems above (mypy.ini)" >&2; exit 1; }
"$PYTHON" -m pytest "$@"
rc=$?
if [[ $rc -eq 5 ]]; then
  echo "[test] pytest collected no tests (exit 5): nothing to run, treated as a pass" >&2
  exit 0
fi
exit $rc
