#!/usr/bin/env bash
# Train the Flux-architecture shapes model on a GPU for a wall-clock budget, evaluate it with the shapes
# evaluation (held-out: adherence, grounding per layer and block kind, ablations; validation: adherence),
# and write the weights and the figures into $OUT (8 files, the weights 4.6 MB):
#
#   OUT=/path/to/out bash scripts/train_flux_shapes_gpu.sh [TRAIN_SECONDS=150] [N_EVAL=48]
#
# Needs python3 with torch, and the repo's other dependencies (diffusers 0.42, transformers 5, numpy,
# safetensors, tqdm, pandas, xarray). A machine without diffusers can be given its wheel: put
# diffusers-0.42.1-py3-none-any.whl (and any other missing pure-Python wheel) in $WHEELS (default .whl/);
# they are installed into /tmp/site first. Settings by environment: DEVICE (cuda), BATCH (128), LR (5e-4),
# N_SCENES (40000), THREADS (2: CPU threads of training), EVAL_STEPS (20), EVAL_BATCH (16), ABLATIONS (1),
# VALIDATION (1), RUN (a temp dir: checkpoints and the training log stay there), PYTHON (python3).
#
# Files in $OUT: transformer.safetensors + config.json (ship both into mmdit_probe/assets/shapes_flux/),
# summary.json (training), train.log, eval_heldout.json, eval_validation.json, report.md (the tables),
# result.json (the headline figures and the ship rule: held-out colour adherence >= 0.9).
set -euo pipefail

TRAIN_SECONDS="${1:-150}"
N_EVAL="${2:-48}"
: "${OUT:?set OUT to the output folder}"
DEVICE="${DEVICE:-cuda}"
BATCH="${BATCH:-128}"
LR="${LR:-5e-4}"
N_SCENES="${N_SCENES:-40000}"
THREADS="${THREADS:-2}"
EVAL_STEPS="${EVAL_STEPS:-20}"
EVAL_BATCH="${EVAL_BATCH:-16}"
ABLATIONS="${ABLATIONS:-1}"
VALIDATION="${VALIDATION:-1}"
PY="${PYTHON:-python3}"

cd "$(dirname "$0")/.."
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

if ! "$PY" -c "import diffusers" 2>/dev/null; then
    WHEELS="${WHEELS:-.whl}"
    if ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
        echo "diffusers is not installed and no wheels are in $WHEELS/. On a machine with pip:" >&2
        echo "  python3 -m pip download --no-deps --only-binary=:all: -d .whl diffusers==0.42.1" >&2
        exit 2
    fi
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl
    export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
"$PY" - "$DEVICE" <<'EOF'
import sys, torch
import mmdit_probe.shapes.train_flux, mmdit_probe.shapes.evaluate  # noqa: F401  (every dependency, before the budget)
dev = torch.device(sys.argv[1])
if dev.type == "cuda" and not torch.cuda.is_available():
    sys.exit(f"DEVICE={sys.argv[1]} but torch {torch.__version__} sees no CUDA GPU")
print(f"torch {torch.__version__} on {torch.cuda.get_device_name(dev) if dev.type == 'cuda' else 'cpu'}")
EOF

RUN="${RUN:-$(mktemp -d)}"
MINUTES="$("$PY" -c "print($TRAIN_SECONDS / 60)")"
echo "== training: $TRAIN_SECONDS s on $DEVICE, batch $BATCH, lr $LR, $N_SCENES scenes -> $RUN"
"$PY" -m mmdit_probe.shapes.train --arch flux --out "$RUN" --minutes "$MINUTES" --device "$DEVICE" \
    --batch "$BATCH" --lr "$LR" --n-scenes "$N_SCENES" --threads "$THREADS" --ckpt-minutes 100000 --log-every 100
cp "$RUN/final/transformer.safetensors" "$RUN/final/config.json" "$RUN/summary.json" "$RUN/train.log" "$OUT/"

EVAL=(--weights "$RUN/final" --device "$DEVICE" --n "$N_EVAL" --steps "$EVAL_STEPS" --batch "$EVAL_BATCH")
echo "== evaluation: $N_EVAL held-out prompts, $EVAL_STEPS steps"
[ "$ABLATIONS" = 1 ] || EVAL+=(--no-ablations)
"$PY" -m mmdit_probe.shapes.evaluate "${EVAL[@]}" --out "$OUT/eval_heldout.json"
if [ "$VALIDATION" = 1 ]; then
    echo "== evaluation: $N_EVAL validation prompts (training distribution)"
    "$PY" -m mmdit_probe.shapes.evaluate --weights "$RUN/final" --device "$DEVICE" --n "$N_EVAL" \
        --steps "$EVAL_STEPS" --batch "$EVAL_BATCH" --no-ablations --split validation --out "$OUT/eval_validation.json"
fi

"$PY" - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
from mmdit_probe.shapes.evaluate import format_report

out = Path(sys.argv[1])
train = json.loads((out / "summary.json").read_text())
held = json.loads((out / "eval_heldout.json").read_text())
val_file = out / "eval_validation.json"
val = json.loads(val_file.read_text()) if val_file.exists() else None
parts = [f"# Flux shapes model: {train['steps']} steps in {train['transformer_minutes'] * 60:.0f} s on {train['device']}",
         "", "## held-out", "", format_report(held)]
if val:
    parts += ["", "## validation", "", format_report(val)]
(out / "report.md").write_text("\n".join(parts) + "\n")
colour = held["adherence"]["colour"]
result = {
    "training": {k: train[k] for k in ("steps", "transformer_minutes", "steps_per_second", "samples_seen",
                                       "final_loss", "parameters", "device")},
    "heldout_adherence": held["adherence"], "heldout_subsets": held["adherence_subsets"],
    "validation_adherence": val["adherence"] if val else None,
    "grounding_by_block_kind": held["grounding_by_block_kind"], "chance_pointing": held["grounding"]["chance_pointing"],
    "ship_rule": "held-out colour adherence >= 0.9", "ship": colour >= 0.9,
}
(out / "result.json").write_text(json.dumps(result, indent=2))
print((out / "report.md").read_text())
print(json.dumps(result, indent=2))
EOF
ls -la "$OUT"
