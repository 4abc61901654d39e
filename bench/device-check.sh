#!/bin/sh
# The GPU check (issue: one copy of the weights, batches that waste no compute), in two steps:
#
#   bench/device-check.sh prepare   here, with PyPI: the wheels neuronserve needs beside a CUDA image's own torch,
#                                   transformers, tokenizers, grpcio, numpy (Python 3.12, x86-64), and MiniLM's
#                                   tokenizer files, into .whl/ (kept out of git)
#   bench/device-check.sh run       on the CUDA machine, with .whl carried: a venv over the image's site-packages,
#                                   the wheels and this checkout installed into it, then python -m bench.device_check
#                                   (MiniLM- and BERT-base-shaped models, one group on the GPU, served / in-process
#                                   throughput and p99 at concurrency 1, 16, 64; about 5 minutes on an H200)
#
# `run` writes $OUT/device-check.md (or bench-results/ without OUT). Nothing here is timed in a test.
set -eu
cd "$(dirname "$0")/.."
WHEELS=".whl"
PACKAGES="fastapi starlette pydantic pydantic-core annotated-types typing-inspection uvicorn uvicorn-worker
gunicorn orjson httptools"

case "${1:-run}" in
prepare)
    mkdir -p "$WHEELS/tokenizer"
    grep -qx "/$WHEELS/" .git/info/exclude 2>/dev/null || echo "/$WHEELS/" >> .git/info/exclude
    pins=""
    for p in $PACKAGES; do pins="$pins $p==$(.venv/bin/python -m pip show "$p" | sed -n 's/^Version: //p')"; done
    # shellcheck disable=SC2086
    .venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
        --platform any -d "$WHEELS" $pins
    .venv/bin/python -c "import shutil, sys; from neuronserve import random_models as r; \
[shutil.copy(r.default_tokenizer_dir() / n, sys.argv[1]) for n in r.TOKENIZER_FILES]" "$WHEELS/tokenizer"
    du -sh "$WHEELS"
    ;;
run)
    python3 -m venv --system-site-packages /tmp/neuronserve-venv
    # shellcheck disable=SC2086
    /tmp/neuronserve-venv/bin/pip install -q --no-index --find-links "$WHEELS" $PACKAGES
    /tmp/neuronserve-venv/bin/pip install -q --no-deps --no-build-isolation -e .
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    /tmp/neuronserve-venv/bin/python -m bench.device_check --backend cuda --tokenizer "$WHEELS/tokenizer" \
        --out "${OUT:-bench-results}"
    ;;
*)
    echo "usage: $0 prepare|run" >&2
    exit 2
    ;;
esac
