#!/usr/bin/env bash
# Checks phi2tutor's TensorBoard dashboard in a real browser: starts TensorBoard on a free local port over a
# log directory, asks its HTTP API for the custom-scalars layout and the HParams rows, opens the CUSTOM SCALARS
# and HPARAMS pages in headless Chromium, saves screenshots, and fails if the layout or the rows are missing.
#
#   bash scripts/check_tensorboard.sh [LOGDIR] [OUTPUT_DIR]      # defaults: lightning_logs, docs/
#
# Needs Debian's chromium (apt-get install chromium); not part of CI (the CI test reads the same layout and
# hparams back from the event files with tensorboard's reader).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
LOGDIR="${1:-$ROOT/lightning_logs}"
OUT="${2:-$ROOT/docs}"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
CHROMIUM="$(command -v chromium || command -v chromium-browser || true)"
if [ -z "$CHROMIUM" ]; then
  echo "check_tensorboard: no chromium on PATH; install it with: apt-get install chromium" >&2
  exit 2
fi
if [ ! -d "$LOGDIR" ]; then
  echo "check_tensorboard: log directory $LOGDIR does not exist; run phi2tutor fit first" >&2
  exit 2
fi
mkdir -p "$OUT"
PORT="$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
"$PY" -m tensorboard.main --logdir "$LOGDIR" --host 127.0.0.1 --port "$PORT" >"$OUT/.tensorboard.log" 2>&1 &
TB_PID=$!
trap 'kill $TB_PID 2>/dev/null || true; rm -f "$OUT/.tensorboard.log"' EXIT
URL="http://127.0.0.1:$PORT"
for _ in $(seq 60); do
  curl -sf "$URL/data/logdir" >/dev/null 2>&1 && break
  sleep 1
done
# The event files are read in the background after start: wait until the runs are listed.
for _ in $(seq 60); do
  [ "$(curl -sf "$URL/data/runs" || echo '[]')" != "[]" ] && break
  sleep 1
done

"$PY" - "$URL" <<'EOF'
import json, sys, urllib.request
url = sys.argv[1]
runs = json.load(urllib.request.urlopen(f"{url}/data/runs"))
layout = json.load(urllib.request.urlopen(f"{url}/data/plugin/custom_scalars/layout"))
titles = [c["title"] for c in layout.get("category", [])]
expected = ["1 loss", "2 answer accuracy", "3 learning rate and grad norm", "4 memory"]
if titles[:4] != expected:
    sys.exit(f"check_tensorboard: FAIL custom-scalars layout {titles}, expected {expected}")
request = urllib.request.Request(
    f"{url}/data/plugin/hparams/session_groups",
    data=json.dumps({"experimentName": "", "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE", "STATUS_RUNNING"],
                     "colParams": [], "startIndex": 0, "sliceSize": 1000}).encode(),
    headers={"Content-Type": "application/json", "X-XSRF-Protected": "1"},
)
groups = json.load(urllib.request.urlopen(request)).get("sessionGroups", [])
if not groups:
    sys.exit("check_tensorboard: FAIL no HParams rows")
print(f"check_tensorboard: runs {len(runs)}; custom-scalars sections {titles}; HParams rows {len(groups)}")
for group in groups:
    hparams = group.get("hparams", {})
    metrics = {m["name"]["tag"]: round(m["value"], 4) for m in group.get("metricValues", [])}
    print(f"  {group['name']}: lora_r={hparams.get('lora_r')} lr={hparams.get('learning_rate')} {metrics}")
EOF

shoot() {  # page, file
  "$CHROMIUM" --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=1400,1000 \
    --virtual-time-budget=15000 --screenshot="$2" "$URL/#$1" >/dev/null 2>&1
  [ -s "$2" ] || { echo "check_tensorboard: FAIL no screenshot of #$1" >&2; exit 1; }
  echo "check_tensorboard: screenshot $2"
}
shoot custom_scalars "$OUT/tensorboard-dashboard.png"
shoot hparams "$OUT/tensorboard-hparams.png"
"$CHROMIUM" --headless --no-sandbox --disable-gpu --virtual-time-budget=15000 --dump-dom "$URL/#custom_scalars" \
  2>/dev/null | grep -q "tf-custom-scalar\|custom-scalar\|custom_scalars" \
  || { echo "check_tensorboard: FAIL the custom-scalars page did not render" >&2; exit 1; }
echo "check_tensorboard: OK"
