#!/usr/bin/env bash
# Wheels the GPU machines lack (machine-notes.md): DeepSpeed (built from its sdist, pure Python),
# its small dependencies missing there, pydantic, and optimenv itself, for CPython 3.12 x86-64.
# Writes them to .whl/ at the repository root (ignored by git: `echo /.whl/ >> .git/info/exclude`).
# --tp adds transformers 5.0.0 and tokenizers 0.22.2 for the fsdp2-tp layout (docs/gpu.md): Accelerate
# 1.15's FSDP2 + TP step imports transformers' ReplicateParallel, which no later 5.x release has.
# --ray adds Ray 2.60.0 for `optimenv run` / the Ray launcher of run.py: its wheel (about 79 MB) is
# over the device's 64 MiB carry limit, so it is written without its Java worker jar (ray/jars/) and
# the dashboard's web bundle (ray/dashboard/client/build/), about 44 MB, plus the Ray Train
# dependencies the GPU image lacks.
set -euo pipefail
cd "$(dirname "$0")/../.."
tp=0 ray=0
for arg in "$@"; do
  case "$arg" in
    --tp) tp=1 ;;
    --ray) ray=1 ;;
    *) echo "usage: $0 [--tp] [--ray]" >&2; exit 2 ;;
  esac
done
# The project's venv builds optimenv's own wheel (its setuptools has bdist_wheel); else $PYTHON.
py=${PYTHON:-python3}
[[ -x .venv/bin/python ]] && py=.venv/bin/python
mkdir -p .whl
plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
download() {
  "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${plat[@]}" "$@"
}
download -d .whl pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 hjson==3.1.0
if [[ $tp == 1 ]]; then
  download -d .whl transformers==5.0.0 tokenizers==0.22.2
fi
if [[ $ray == 1 ]]; then
  download -d .whl jsonschema==4.26.0 referencing==0.37.0 jsonschema-specifications==2025.9.1 \
    rpds-py==2026.9.1 tensorboardX==2.6.5
  if ! ls .whl/ray-2.60.0-*.whl >/dev/null 2>&1; then
    full=$(mktemp -d)
    download -d "$full" ray==2.60.0
    whl=$(ls "$full"/ray-2.60.0-*.whl)
    "$py" bench/gpu/trim_wheel.py "$whl" ".whl/$(basename "$whl")" ray/jars/ ray/dashboard/client/build/
    rm -rf "$full"
  fi
fi
ls .whl/deepspeed-0.19.8-*.whl >/dev/null 2>&1 || "$py" -m pip wheel -q --no-deps deepspeed==0.19.8 -w .whl
rm -f .whl/optimenv-*.whl
"$py" -m pip wheel -q --no-deps --no-build-isolation . -w .whl
rm -rf build
ls -la .whl
