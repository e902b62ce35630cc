#!/usr/bin/env bash
# The whole pytest suite; pytest's exit 5 (nothing collected) is reported, not hidden as a pass.
set -uo pipefail
cd "$(dirname "$0")/.."
.venv/bin/python -m pytest "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: this is a failure of the suite's setup" >&2
  exit 1
fi
exit "$rc"
