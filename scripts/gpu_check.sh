#!/usr/bin/env bash
# GPU check (run when a GPU machine is available; about 10 minutes on one H100/H200):
# 1. the train loaders alone and beside a training step on the GPU (benchmarks/loader.py --step cuda): images/s,
#    cells per sample and the share of step time spent waiting for data, ours vs Ultralytics';
#    validation's stages per image on the GPU (benchmarks/validation.py --device cuda);
# 2. trains yolov8s-seg, then yolo26s-seg, at imgsz 640 with bf16-mixed for ~100 steps each with cellseg_pl and
#    with `yolo segment train` on the same synthetic data, and prints images/s, peak GPU memory, GPU utilisation (is
#    the loader keeping the GPU busy?) and the final metrics of both, scored by one evaluator.
#
#   bash scripts/gpu_check.sh [EPOCHS] [N_TRAIN]      # defaults: 4 epochs, 400 train images (batch 16: 100 steps)
#   MODELS="yolov8s-seg.yaml" bash scripts/gpu_check.sh   # one family only
set -euo pipefail
cd "$(dirname "$0")/.."
EPOCHS=${1:-4}
MODELS=${MODELS:-yolov8s-seg.yaml yolo26s-seg.yaml}
N_TRAIN=${2:-400}
OUT=${OUT:-checkpoints/gpu_check}
[ -x .venv/bin/python ] || source scripts/setup_env.sh
source .venv/bin/activate
export YOLO_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python - <<PY
from cellseg_pl.data.demo import make_demo_dataset
make_demo_dataset("data/demo640", n_train=${N_TRAIN}, n_val=48, size=640, seed=1)
PY
mkdir -p "$OUT"
WORKERS=$(( $(nproc) > 9 ? 8 : $(nproc) - 1 ))
python -m benchmarks.loader --data data/demo640/dataset.yaml --imgsz 640 --batch 16 --workers 0 "$WORKERS" \
    --rounds 3 --batches 8 --step cuda | tee "$OUT/loader.txt"
# validation, stage by stage, with the forward and the mask assembly on the GPU (ms per image, 10-300 detections)
python -m benchmarks.validation --device cuda --model yolov8s-seg.yaml | tee "$OUT/validation.txt"
# sample GPU utilisation every 0.5 s while the benchmark runs
nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader,nounits -lms 500 > "$OUT/gpu_util.csv" &
SMI=$!
trap 'kill $SMI 2>/dev/null || true' EXIT
for MODEL in $MODELS; do
    python -m benchmarks.vs_ultralytics --data data/demo640/dataset.yaml --model "$MODEL" \
        --epochs "$EPOCHS" --imgsz 640 --batch 16 --nbs 64 --workers "$WORKERS" --device 0 --precision bf16-mixed \
        --out "$OUT/bench_${MODEL%.yaml}" | tee "$OUT/bench_${MODEL%.yaml}.txt"
done
kill $SMI 2>/dev/null || true
python - "$OUT" $MODELS <<'PY'
import csv, json, sys
from pathlib import Path
out = Path(sys.argv[1])
rows = [r for r in csv.reader(open(out / "gpu_util.csv")) if len(r) >= 3]
util = [float(r[1]) for r in rows]
busy = [u for u in util if u > 0]
print(f"GPU utilisation over the whole run: mean {sum(util)/max(len(util),1):.0f}%, "
      f"mean while busy {sum(busy)/max(len(busy),1):.0f}% ({len(util)} samples)")
for model in sys.argv[2:]:
    bench = json.loads((out / f"bench_{model.removesuffix('.yaml')}" / "bench.json").read_text())
    for name, r in bench.items():
        t, v = r["train_s"], r["val_s"]
        print(f"{model} {name}: train epochs {', '.join(f'{x:.1f}' for x in t)} s; "
              f"val {', '.join(f'{x:.1f}' for x in v)} s")
PY
