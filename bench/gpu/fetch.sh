#!/usr/bin/env bash
# Run HERE (a machine with PyPI access, after `make install`: it pins the versions of .venv)
# before carrying the repository to an accelerator
# machine with no network: wheels of everything hwcompress needs that such a machine lacks
# (it has JAX with CUDA, flax, optax, numpy, pandas, scikit-learn, scikit-image, onnxruntime),
# for its Python (PYV, default 3.12), and Fashion-MNIST's four IDX files, into
# bench/gpu/carry/ (git-ignored). Then, with the device tool:
#   run(command="bash bench/gpu/run.sh", carry=["bench/gpu/carry"])
# Never carry our own jax, flax or optax: flax 0.12.8 fails to import against jax 0.11.2 there.
set -euo pipefail
cd "$(dirname "$0")"
PYV=${PYV:-3.12}
PIP=${PIP:-../../.venv/bin/pip}
rm -rf carry && mkdir -p carry/wheels carry/fashion-mnist
# versions pinned to what this repository is tested with (.venv), each without its dependencies:
# the list is the closure minus what the accelerator machine already has
pkgs=$(../../.venv/bin/python - <<'PY'
from importlib.metadata import version
names = ["optuna", "sqlalchemy", "alembic", "colorlog", "mako", "markupsafe", "plotly",
         "narwhals", "tqdm", "pyyaml", "safetensors", "rich", "markdown-it-py", "mdurl", "pygments",
         "packaging", "typing_extensions"]  # not onnx: nothing on the search path exports
print(" ".join(f"{n}=={version(n)}" for n in names))
PY
)
"$PIP" download --quiet --no-deps --only-binary=:all: --python-version "$PYV" \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    --platform any -d carry/wheels $pkgs
cp "${FASHION_MNIST_DIR:-/usr/share/datasets/fashion-mnist}"/*-ubyte.gz carry/fashion-mnist/
du -sh carry
