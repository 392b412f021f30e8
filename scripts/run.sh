#!/usr/bin/env bash
# One entry point for mpu-bridge's two jobs on a fresh machine:
#   scripts/run.sh main   - set up .venv (if needed) and run the main job
#   scripts/run.sh test   - set up .venv (if needed) and run the whole test suite
# The environment is pinned by compat/constraints.txt (torch = the local CPU build).
set -euo pipefail
cd "$(dirname "$0")/.."
job="${1:-}"; shift || true
venv="${MPU_BRIDGE_VENV:-.venv}"
python="${PYTHON:-python3}"
export DS_BUILD_OPS=0 DS_ACCELERATOR=cpu

stamp="$venv/.mpu-bridge-installed"
want="$(cat pyproject.toml compat/constraints.txt | sha256sum | cut -d' ' -f1)"
if [ ! -x "$venv/bin/python" ]; then
    # torch 2.13 (pinned) needs Python 3.10+; say so instead of pip's ResolutionImpossible.
    if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
        echo "[run.sh] $python is not Python 3.10 or newer (torch 2.13 needs it): set PYTHON=python3.11" >&2
        exit 2
    fi
    "$python" -m venv "$venv"
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "[run.sh] installing into $venv (torch pinned to the local CPU build)" >&2
    # torch first and by exact version, so nothing below can pull a CUDA build.
    "$venv/bin/python" -m pip install -q -c compat/constraints.txt torch==2.13.0
    "$venv/bin/python" -m pip install -q -c compat/constraints.txt -e ".[megatron,deepspeed,test,lint]"
    echo "$want" > "$stamp"
fi
export PATH="$PWD/$venv/bin:$PATH"

case "$job" in
    main)
        exec bash scripts/main_job.sh "$@"
        ;;
    test)
        # Code health first (seconds): lint of the whole repository (the package, its
        # tests, compat/, benchmarks, examples, integration programs, scripts: every
        # Python file but the environments ruff excludes), and a type check of the
        # package (it ships py.typed).
        "$venv/bin/ruff" check .
        "$venv/bin/mypy"
        exec "$venv/bin/python" -m pytest -q "$@"
        ;;
    *)
        echo "usage: scripts/run.sh main|test [args...]" >&2
        exit 2
        ;;
esac
