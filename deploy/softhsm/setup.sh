#!/usr/bin/env bash
# Idempotent SoftHSM2 token setup for the tokens the signing policy names (and the audit
# checkpoint token). PINs are read from files and never echoed; see init_tokens.py for the
# variables. Runs in the container (entrypoint.sh init-softhsm) and on a host alike.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
APP_DIR=${APP_DIR:-$(cd "$here/../.." && pwd)}
PYTHON=${PYTHON:-python3}
export PYTHONPATH="$APP_DIR${PYTHONPATH:+:$PYTHONPATH}"
exec "$PYTHON" "$here/init_tokens.py"
