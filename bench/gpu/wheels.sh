#!/usr/bin/env bash
# Wheels the GPU machines lack (machine-notes.md): DeepSpeed (built from its sdist, pure Python),
# its small dependencies missing there, pydantic, and optimenv itself, for CPython 3.12 x86-64.
# Writes them to .whl/ at the repository root (ignored by git: `echo /.whl/ >> .git/info/exclude`).
# --tp adds transformers 5.0.0 and tokenizers 0.22.2 for the fsdp2-tp layout (docs/gpu.md): Accelerate
# 1.15's FSDP2 + TP step imports transformers' ReplicateParallel, which no later 5.x release has.
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p .whl
plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${plat[@]}" \
  -d .whl pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 hjson==3.1.0
if [[ "${1:-}" == "--tp" ]]; then
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${plat[@]}" \
    -d .whl transformers==5.0.0 tokenizers==0.22.2
fi
ls .whl/deepspeed-0.19.8-*.whl >/dev/null 2>&1 || python3 -m pip wheel -q --no-deps deepspeed==0.19.8 -w .whl
rm -f .whl/optimenv-*.whl
python3 -m pip wheel -q --no-deps --no-build-isolation . -w .whl
rm -rf build
ls -la .whl
