# Sourced by demo.sh and test.sh: create or reuse .venv and install what the project needs.
# torch is installed first and explicitly, so pip does not pull a multi-GB CUDA build for the
# plain requirement; set TORCH_SPEC (e.g. "torch==2.13.0 --index-url ...cu121") for a GPU build.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${PHI2TUTOR_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "phi2tutor | creating virtual environment $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  echo "phi2tutor | installing ${TORCH_SPEC:-torch==2.13.0}"
  # shellcheck disable=SC2086
  "${PIP[@]}" install ${TORCH_SPEC:-torch==2.13.0}
fi
# Reinstall only when pyproject.toml changed since the last install.
STAMP="$VENV/.phi2tutor-installed"
WANT="$(sha256sum "$ROOT/pyproject.toml" | cut -d' ' -f1)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
  echo "phi2tutor | installing phi2tutor and its dependencies (pip install -e .[dev])"
  LOG="$VENV/.phi2tutor-install.log"
  if ! "${PIP[@]}" install -e "$ROOT[dev]" >"$LOG" 2>&1; then
    tail -30 "$LOG"; echo "phi2tutor | pip install failed; full log: $LOG" >&2; exit 1
  fi
  "$VENV/bin/python" -c "import phi2tutor, lightning, transformers, peft, bitsandbytes" 
  echo "$WANT" > "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
export TOKENIZERS_PARALLELISM=false
cd "$ROOT"
