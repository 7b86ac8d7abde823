#!/usr/bin/env bash
# The demo: sets up .venv if needed, LoRA-tunes the bundled 0.9M-parameter Phi base into a tutor of
# word problems on the CPU (configs/demo.yaml), grades it on held-out problems, and shows the report.
source "$(dirname "${BASH_SOURCE[0]}")/venv.sh"
CONFIG="${1:-configs/demo.yaml}"

echo "phi2tutor | 1/3 fit: phi2tutor fit --config $CONFIG"
phi2tutor fit --config "$CONFIG"
RUN="$(ls -td lightning_logs/version_* | head -1)"

echo
echo "phi2tutor | 2/3 validate and test the saved adapter on held-out problems"
phi2tutor validate --config "$CONFIG" --model.adapter_path "$RUN/adapter" --trainer.logger false
phi2tutor test --config "$CONFIG" --model.adapter_path "$RUN/adapter" --trainer.logger false

echo
echo "phi2tutor | 3/3 the training report, written by the TrainingReport callback when fit ended:"
echo
cat "$RUN/report.md"
cat <<EOF

phi2tutor | done. Where things are:
  run directory  $RUN   (curves: tensorboard --logdir lightning_logs)
  report         $RUN/report.md, report.json and the PNG figures   (Spanish: phi2tutor report $RUN --language es)
  checkpoints    $RUN/checkpoints/   (resume: phi2tutor fit --config $CONFIG --ckpt_path $RUN/checkpoints/last.ckpt)
  adapter        $RUN/adapter and models/demo-tutor   (peft adapter + tokenizer; --model.adapter_path loads it)
EOF
