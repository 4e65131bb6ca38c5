#!/bin/sh
# Fetch the real models and text of benchmarks/real_models.py into the cache (see fetch_real.py).
# Usage: benchmarks/fetch_real.sh [--cache DIR] [--force] [--only minilm-l6,smollm2-135m,python-doc,wordnet,shakespeare]
set -eu
exec python "$(dirname "$0")/fetch_real.py" "$@"
