#!/usr/bin/env bash
# .ci/gpu-check.sh: transfer's one-call GPU check (`make gpu-check`; one H100/H200, offline, no downloads,
# about 6-9 minutes). Random-init models only (timm resnet18 / test_resnet, torchvision resnet50 /
# efficientnet_b0 with weights=null) on JPEGs it generates. Run from the repository root, with the project
# installed (pip install -e ".[all]") in the Python given as PY:
#
#   make gpu-check [OUT=DIR]                                     # results in outputs/gpu-check, or DIR
#   PY=.venv/bin/python bash .ci/gpu-check.sh [OUT_DIR]          # default OUT_DIR /tmp/transfer-gpu-check
#   make gpu-check DEVICE=cpu SMALL=1 COMPILE_BACKEND=eager       # dry run of the logic on a CPU
#
# Environment: PY (the Python, default python), DEVICE (cuda, or cpu for a dry run), SMALL=1 (small images
# and splits), COMPILE_BACKEND (torch.compile's backend in step 8; eager runs dynamo without inductor).
# A dry run takes 3-5 minutes on 2 CPU cores; the steps that need CUDA (fp16 + GradScaler, cudnn.benchmark,
# `transfer bench --gpu`) say so and measure nothing there.
#
# Steps (each PASS / FAIL / SKIP / INFO, summary at the end and in OUT_DIR/summary.txt, exit 1 if any FAIL):
#   1 environment          torch, CUDA, GPU, bf16 support (with and without emulation)
#   2 data                 4-class JPEG folder with train/ and val/
#   3 probes               precision choice; host syncs per training step (plain bf16, EMA, MixUp/CutMix,
#                          grad_clip, forced fp16+GradScaler with fused AdamW and with SGD); syncs in the
#                          feature-cache extraction and in `transfer eval`'s counting; cudnn.benchmark off vs
#                          on (resnet50); figures in OUT_DIR/probe.json
#   4 AMP bf16 train + resume   uninterrupted run vs one killed (os._exit) after a mid-epoch checkpoint in the
#                          last stage and continued by `transfer resume` in a fresh process; metrics within
#                          tolerance; then `transfer eval` and `transfer predict` on the resumed run
#   5 feature cache        feature_extract with the cache vs without it: same val metrics within tolerance
#   6 DDP                  torchrun 1 process (NCCL/plain path); 2 processes on this one GPU over gloo
#                          (NCCL refuses two ranks on one GPU) -> DDP wrap/re-wrap, all_reduce, buffer sync;
#                          NCCL with 2 processes when 2+ GPUs are visible
#   7 bench-gpu            transfer bench --gpu (resnet50, efficientnet_b0, batch 128, 224 px); on a CPU the
#                          same code path on a tiny model
#   8 torch.compile        gradual run with trainer.compile=true (inductor): recompiles, recompile_limit hits
set -u -o pipefail
PY=${PY:-python}
DEVICE=${DEVICE:-cuda}
SMALL=${SMALL:-0}
OUT=${1:-${OUT:-/tmp/transfer-gpu-check}}
REPO=$(pwd)
mkdir -p "$OUT" && (cd "$OUT" && rm -rf py runs jpegs bench feature-cache torch-home probe-run) && mkdir -p "$OUT/py" "$OUT/runs"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HYDRA_FULL_ERROR=1 PYTHONUNBUFFERED=1
export TRANSFER_CACHE="$OUT/feature-cache" TORCH_HOME="$OUT/torch-home" MPLBACKEND=Agg
START=$(date +%s)
RESULTS=()
step() {  # step NAME TIMEOUT_S CMD...
  local name=$1 limit=$2; shift 2
  local t0=$(date +%s) rc
  echo; echo "=================== $name (limit ${limit}s)"
  timeout -k 15 "$limit" "$@"; rc=$?
  local took=$(( $(date +%s) - t0 ))
  if [ $rc -eq 0 ]; then RESULTS+=("PASS  $name (${took}s)")
  elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then RESULTS+=("FAIL  $name: stopped at its ${limit}s limit")
  else RESULTS+=("FAIL  $name: rc=$rc (${took}s)"); fi
  echo "------------------- $name: rc=$rc in ${took}s"
}
elapsed() { echo $(( $(date +%s) - START )); }

if [ "$SMALL" = 1 ]; then IMG=48; NTRAIN=24; NVAL=9; BS=16; else IMG=128; NTRAIN=64; NVAL=25; BS=32; fi  # ragged last val batch, as in real data
DATA="$OUT/jpegs"
COMMON=(backbone=timm backbone.name=resnet18 backbone.pretrained=false dataset=folder "dataset.root=$DATA"
        "transforms.image_size=$IMG" "trainer.device=$DEVICE" "trainer.batch_size=$BS" trainer.num_workers=0
        optimizer.lr_scale=10)

# --------------------------------------------------------------------------- helper programs
cat > "$OUT/py/make_jpegs.py" <<'EOF'
"""4 classes of class-dependent stripes + noise (learnable, unlike pure noise), train/ and val/."""
import sys
from pathlib import Path
import numpy as np
from PIL import Image
root, ntrain, nval, size = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
rng = np.random.default_rng(0)
yy, xx = np.mgrid[0:size, 0:int(size * 1.25)]
for split, n in (("train", ntrain), ("val", nval)):
    for k in range(4):
        folder = root / split / f"class_{k}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            angle = k * np.pi / 4 + rng.normal(0, 0.15)
            wave = np.sin((np.cos(angle) * xx + np.sin(angle) * yy) / (3 + k))
            base = np.stack([wave * (60 + 40 * c) for c in range(3)], -1) + 128
            pixels = np.clip(base + rng.normal(0, 40, base.shape), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{i:04d}.jpg", quality=90)
print("wrote", sum(1 for _ in root.rglob("*.jpg")), "JPEGs under", root)
EOF

cat > "$OUT/py/env.py" <<'EOF'
import os, torch, torchvision, timm
print("torch", torch.__version__, "cuda", torch.version.cuda, "torchvision", torchvision.__version__, "timm", timm.__version__)
device = os.environ.get("DEVICE", "cuda")
if not device.startswith("cuda"):
    print("DEVICE", device, "| CUDA checks: SKIP (no CUDA device asked for)")
else:
    assert torch.cuda.is_available(), "torch.cuda.is_available() is False"
    p = torch.cuda.get_device_properties(0)
    print("gpu", torch.cuda.get_device_name(0), f"sm{p.major}{p.minor}", f"{p.total_memory / 2**30:.0f} GiB",
          "count", torch.cuda.device_count())
    print("is_bf16_supported()", torch.cuda.is_bf16_supported(),
          "| without emulation", torch.cuda.is_bf16_supported(including_emulation=False),
          "(these differ on pre-Ampere GPUs, where trainer.amp=auto picks fp16 with a GradScaler: models/runtime.native_bf16)")
    print("cudnn", torch.backends.cudnn.version(), "benchmark", torch.backends.cudnn.benchmark,
          "matmul.allow_tf32", torch.backends.cuda.matmul.allow_tf32, "cudnn.allow_tf32", torch.backends.cudnn.allow_tf32,
          "float32_matmul_precision", torch.get_float32_matmul_precision())
import transfer_cli
print("transfer_cli", transfer_cli.__version__, "from", transfer_cli.__file__)
EOF

cat > "$OUT/py/probe.py" <<'EOF'
"""Precision choice, host syncs per step (torch.cuda.set_sync_debug_mode), fp16 + GradScaler on CUDA, cudnn.benchmark.
Each model is assembled as `transfer train` assembles it (training.assemble.prepare) and enters stage 0 as fit
and benchmarks/gpu.py do (training.stages.enter_stage); synthetic batches are what the run's loaders yield:
uint8 where the run normalizes on the device (trainer.normalize_on_device=auto: on CUDA), else normalized floats."""
import json, os, sys, time, warnings
from dataclasses import replace
from pathlib import Path
import torch
from transfer_cli.config.compose import compose_config
from transfer_cli.data.loaders import TransformedDataset, make_loader
from transfer_cli.data.transforms import eval_transform
from transfer_cli.inference.evaluate import count_predictions
from transfer_cli.training import feature_cache
from transfer_cli.training.assemble import prepare
from transfer_cli.training.loop import StepRunner, Tally
from transfer_cli.training.stages import enter_stage
from transfer_cli.training.state import Progress

data, img, out, small = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3]), sys.argv[4] == "1"
device = os.environ.get("DEVICE", "cuda")
cuda = device.startswith("cuda")
failures, report = [], {}

def build(extra, name="resnet18", source="timm", bs=32, size=None):
    model = ([f"backbone=timm", f"backbone.name={name}", "backbone.pretrained=false"] if source == "timm" else
             ["backbone=torchvision", f"backbone.name={name}", "backbone.weights=null"])
    cfg = compose_config([*model, "dataset=folder", f"dataset.root={data}", f"transforms.image_size={size or img}",
                          f"trainer.device={device}", f"trainer.batch_size={bs}", "trainer.num_workers=0",
                          "strategy=fine_tune", "trainer.cache_features=false", "dataset.cache_images=false", *extra])
    prepared = prepare(cfg, out / "probe-run")
    # stage 0 entered as fit enters it: its freezing, BatchNorm policy and optimizer groups. Without DDP, a
    # feature cache or trainer.compile, the stage runs the setup's own network (its runner is a copy of
    # setup.runner that shares every part), so the probes below time what the run's steps run.
    run = enter_stage(prepared.setup, Progress(), 0)
    assert isinstance(run.runner, StepRunner) and run.runner.model is prepared.setup.runner.model \
        and run.cached is None and run.compiled is None, "stage 0 runs something other than the setup's network"
    prepared.setup.model.model.train()
    return prepared

def batches(prepared, bs):
    size = prepared.preprocessing.image_size
    x, y = torch.randn(bs, 3, size, size), torch.randint(0, prepared.setup.num_classes, (bs,))
    if prepared.setup.runner.precision.normalize is not None:
        # trainer.normalize_on_device: the run's loaders yield uint8 batches that Precision.to_device converts
        # and normalizes on the device
        x = torch.randint(0, 256, (bs, 3, size, size), dtype=torch.uint8)
    if cuda:
        x, y = x.pin_memory(), y.pin_memory()
    while True:
        yield x, y

class SyncCounter:
    """Counts synchronizing CUDA calls (cudaStreamSynchronize, .item(), blocking copies) with their Python line."""
    def __enter__(self):
        self.caught = warnings.catch_warnings(record=True)
        self.records = self.caught.__enter__()
        warnings.simplefilter("always")
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode(1)
        return self
    def __exit__(self, *exc):
        if cuda:
            torch.cuda.set_sync_debug_mode(0)
        self.caught.__exit__(*exc)
    def where(self):
        hits = [w for w in self.records if "synchroniz" in str(w.message)]
        places = {}
        for w in hits:
            key = f"{os.path.basename(w.filename)}:{w.lineno}"
            places[key] = places.get(key, 0) + 1
        return len(hits), places

def syncs_per_step(runner, source, steps=8):
    tally = Tally(runner.precision.device, (1,))
    for _ in range(3):  # warm: lazy inits, cudnn, scaler
        runner(*runner.precision.to_device(*next(source)), tally)
    with SyncCounter() as counter:
        for _ in range(steps):
            runner(*runner.precision.to_device(*next(source)), tally)
    n, places = counter.where()
    finite = not bool(tally.nonfinite.item())
    return {"syncs_per_step": n / steps, "where": places, "finite": finite}

# 1. precision chosen by trainer.amp=auto
p = build([])
prec, scaler = p.setup.runner.precision, p.setup.runner.scaler
report["auto_precision"] = {"amp": str(prec.amp_dtype), "scaler": scaler is not None, "channels_last": prec.channels_last,
                            "fused_optimizer": bool(p.setup.optimizer.optimizer.defaults.get("fused"))}
if cuda and (prec.amp_dtype != torch.bfloat16 or scaler is not None):
    failures.append(f"expected bf16 without a GradScaler on this GPU, got {report['auto_precision']}")

# 2. host syncs per training step (docs/performance.md: none between trainer.log_every checks)
bs = 16 if small else 64
variants = {"bf16 plain": ([], None), "bf16 + EMA (trainer.ema_decay)": (["trainer.ema_decay=0.999"], None),
            "bf16 + MixUp/CutMix": (["augment.mixup_alpha=0.2", "augment.cutmix_alpha=1.0"], None),
            "bf16 + grad_clip": (["trainer.grad_clip=1.0"], None)}
if cuda:
    variants["fp16 + GradScaler + fused AdamW + clip (forced)"] = (["trainer.grad_clip=1.0"], "fp16")
    variants["fp16 + GradScaler + SGD (forced)"] = (["optimizer=sgd"], "fp16")
else:
    report["syncs: fp16 + GradScaler (forced)"] = f"SKIP: needs CUDA (DEVICE={device})"
for name, (extra, force) in variants.items():
    p = build(extra, bs=bs)
    runner = p.setup.runner
    if force == "fp16":
        runner = replace(runner, precision=replace(runner.precision, amp_dtype=torch.float16),
                         scaler=torch.amp.GradScaler("cuda"))
    result = syncs_per_step(runner, batches(p, bs))
    if runner.scaler is not None:
        result["scaler_scale"] = runner.scaler.get_scale()
        sd = runner.scaler.state_dict()
        fresh = torch.amp.GradScaler("cuda"); fresh.load_state_dict(sd)
        result["scaler_state_roundtrip"] = fresh.get_scale() == runner.scaler.get_scale()
    report[f"syncs: {name}"] = result
    if not result["finite"]:
        failures.append(f"{name}: non-finite loss")

# 3. feature-cache extraction and eval counting: syncs per batch
p = build(["strategy=feature_extract", "augment=none"], bs=bs)
loader = make_loader(TransformedDataset(p.splits.val, eval_transform(p.preprocessing)), bs, train=False,
                     num_workers=0, seed=0, pin_memory=cuda)
nb = len(loader)
# the feature cache reads its images as the run builds it (assemble._feature_cache_source): uint8 where the run
# normalizes on the device; `transfer eval` reads normalized floats
cache_loader = make_loader(TransformedDataset(p.splits.val, eval_transform(
    p.preprocessing, normalize=p.setup.runner.precision.normalize is None)), bs, train=False, num_workers=0, seed=0,
    pin_memory=cuda)
with SyncCounter() as c:
    feats, labels = feature_cache.compute_features(p.setup.model, cache_loader, p.setup.runner.precision)
report["syncs: feature_cache.compute_features"] = {"per_batch": c.where()[0] / nb, "where": c.where()[1],
                                                   "features": list(feats.shape)}
with SyncCounter() as c:
    count_predictions(p.setup.model.model, loader, p.setup.runner.precision, p.setup.num_classes)
report["syncs: inference.evaluate.count_predictions"] = {"per_batch": c.where()[0] / nb, "where": c.where()[1]}

# 4. cudnn.benchmark off vs on: what it buys on resnet50. prepare() (models/runtime.configure_cuda_math) turns
# it and TF32 on for every CUDA run (off with trainer.deterministic=true), as `transfer bench --gpu` measures;
# the flag is put back to what prepare() set. CUDA only, and not with SMALL=1.
if not (cuda and not small):
    report["cudnn.benchmark off vs on"] = "SKIP: " + ("SMALL=1" if cuda else f"needs CUDA (DEVICE={device})")
if cuda and not small:
    p = build(["optimizer=adamw"], name="resnet50", source="torchvision", bs=128, size=224)
    train_setting = torch.backends.cudnn.benchmark
    report["cudnn.benchmark as prepare() sets it"] = train_setting
    src = batches(p, 128)
    rates = {}
    for flag in (False, True):
        torch.backends.cudnn.benchmark = flag
        tally = Tally(p.setup.runner.precision.device, (1,))
        for i in range(35):
            if i == 10:
                torch.cuda.synchronize(); t0 = time.perf_counter()
            p.setup.runner(*p.setup.runner.precision.to_device(*next(src)), tally)
        torch.cuda.synchronize()
        rates[f"benchmark={flag}"] = round(25 * 128 / (time.perf_counter() - t0))
    torch.backends.cudnn.benchmark = train_setting
    report["resnet50 bf16 channels_last synthetic images/s"] = rates
    report["max_memory_allocated_GiB"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)

print(json.dumps(report, indent=1, default=str))
(out / "probe.json").write_text(json.dumps(report, indent=1, default=str))
print("FAILURES:", failures or "none")
sys.exit(1 if failures else 0)
EOF

cat > "$OUT/py/crash_train.py" <<'EOF'
"""`transfer train ARGS`, killed (os._exit, no cleanup) right after step S of epoch E and its checkpoint.
The kill comes from a fit Callback (training.fit.Callback): on_step(epoch, step) runs after each optimizer step,
after fit saved last.pt where trainer.checkpoint_every_steps falls on it. `transfer train` passes no callbacks,
so this wraps training.run.train (which training.job looks up when the job starts) to add one."""
import os, sys
from transfer_cli.training import run
from transfer_cli.training.fit import Callback
E, S, args = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]

class Kill(Callback):
    def on_step(self, epoch, step):
        if epoch == E and step == S:
            print(f"crash_train: killing the process after epoch {epoch} step {step}", flush=True)
            os._exit(99)

real = run.train
def train(cfg, run_dir, resume=None, *, callbacks=(), **kw):
    return real(cfg, run_dir, resume, callbacks=(*callbacks, Kill()), **kw)
run.train = train
from transfer_cli.cli import main
sys.exit(main(["train", *args]))
EOF

cat > "$OUT/py/compare.py" <<'EOF'
"""Compare two runs' metrics.jsonl (and summaries) within tolerance; print the largest differences.
BEFORE=E: epochs before E ran in separate processes of the same code on the same GPU (no resume yet), so their
differences are the GPU's own run-to-run noise; later epochs pass within max(tolerance, 3 x that noise)."""
import json, os, sys
from pathlib import Path
a, b, rel = Path(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3])
expect = dict(kv.split("=", 1) for kv in sys.argv[4:])
before = int(os.environ.get("BEFORE", "0"))
read = lambda d: [json.loads(l) for l in (d / "metrics.jsonl").read_text().splitlines() if l.strip()]
ra, rb = read(a), read(b)
ok = [r["epoch"] for r in ra] == [r["epoch"] for r in rb]
print("epochs", [r["epoch"] for r in ra], [r["epoch"] for r in rb])
keys = ("train/loss", "train/acc1", "val/loss", "val/acc1")
diff = lambda x, y, k: abs(x[k] - y[k]) / max(abs(x[k]), 1e-3)
noise = max([diff(x, y, k) for x, y in zip(ra, rb) if x["epoch"] < before for k in keys] or [0.0])
limit = max(rel, 3 * noise)
worst = 0.0
for x, y in zip(ra, rb):
    for k in keys:
        d = diff(x, y, k)
        worst = max(worst, d)
        flag = "  <-- beyond tolerance" if d > limit + 1e-9 else ""
        ok &= not flag
        print(f"epoch {x['epoch']} {k:11s} {x[k]:.6f} {y[k]:.6f} rel.diff {d:.2e}{flag}")
    print(f"epoch {x['epoch']} lr {x['lr']} | {y['lr']}  images/s {x['train/images_per_s']:.0f} | {y['train/images_per_s']:.0f}")
print(f"largest relative difference {worst:.2e}; run-to-run noise before epoch {before}: {noise:.2e}; limit {limit:.2e}; "
      f"bitwise equal: {all(x[k] == y[k] for x, y in zip(ra, rb) for k in keys)}")
for d in (a, b):
    s = json.loads((d / "summary.json").read_text())
    print(d.name, {k: s.get(k) for k in ("status", "device", "amp", "world_size", "best_val_acc", "train_images_per_s")})
    for k, v in expect.items():
        if str(s.get(k)) != v:
            print(f"  summary[{k}]={s.get(k)!r}, expected {v}"); ok = False
sys.exit(0 if ok else 1)
EOF

cat > "$OUT/py/check_bench.py" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
print(json.dumps(r, indent=1))
ok = r.get("available") and all(m["synthetic_images_per_s"] > 0 and m["jpeg_images_per_s"] > 0 and m["amp"] == "bfloat16"
                                and not m["grad_scaler"] and m["channels_last"] for m in r["models"].values())
sys.exit(0 if ok else 1)
EOF

cat > "$OUT/py/compile_count.py" <<'EOF'
"""`transfer train ARGS` with trainer.compile=true; TORCH_LOGS=recompiles goes to stderr (counted by the caller).
COMPILE_BACKEND=eager: the same guards and recompiles without inductor (dry runs on a CPU)."""
import os, sys
import torch
backend = os.environ.get("COMPILE_BACKEND", "inductor")
if backend != "inductor":
    real = torch.compile
    torch.compile = lambda model, **kw: real(model, backend=backend, **kw)
from transfer_cli.cli import main
sys.exit(main(["train", *sys.argv[1:]]))
EOF

# --------------------------------------------------------------------------- 1-2: environment and data
step "1 environment" 120 env DEVICE="$DEVICE" "$PY" "$OUT/py/env.py"
[ "$DEVICE" = cuda ] && nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total,utilization.gpu --format=csv
step "2 data" 120 "$PY" "$OUT/py/make_jpegs.py" "$DATA" "$NTRAIN" "$NVAL" "$IMG"

# --------------------------------------------------------------------------- 3: probes
step "3 probes (precision, host syncs, fp16+GradScaler, cudnn.benchmark)" 240 \
  env DEVICE="$DEVICE" "$PY" "$OUT/py/probe.py" "$DATA" "$IMG" "$OUT" "$SMALL"
[ "$DEVICE" = cuda ] || RESULTS+=("SKIP  3 host-sync counts, fp16+GradScaler, cudnn.benchmark: need CUDA (DEVICE=$DEVICE)")

# --------------------------------------------------------------------------- 4: AMP bf16 train + kill + resume
RUN=("${COMMON[@]}" strategy=gradual trainer.epochs=4 trainer.checkpoint_every_steps=2)
step "4a train uninterrupted (gradual, bf16)" 240 "$PY" -m transfer_cli train "${RUN[@]}" "hydra.run.dir=$OUT/runs/a"
timeout -k 15 240 "$PY" "$OUT/py/crash_train.py" 3 2 "${RUN[@]}" "hydra.run.dir=$OUT/runs/b"
rc=$?; if [ $rc -eq 99 ]; then RESULTS+=("PASS  4b killed after epoch 3 step 2 (rc 99)"); else RESULTS+=("FAIL  4b crash run rc=$rc (expected 99)"); fi
step "4c transfer resume in a fresh process" 240 "$PY" -m transfer_cli resume "$OUT/runs/b"
AMP=bfloat16; [ "$DEVICE" = cpu ] && AMP=None
step "4d resumed == uninterrupted (rel. tolerance 5%)" 60 env BEFORE=3 "$PY" "$OUT/py/compare.py" "$OUT/runs/a" "$OUT/runs/b" 0.05 \
  status=finished "amp=$AMP"
step "4e transfer eval on $DEVICE (checkpoint=last)" 120 "$PY" -m transfer_cli eval "$OUT/runs/b" checkpoint=last
step "4f transfer predict on $DEVICE" 120 "$PY" -m transfer_cli predict "$OUT/runs/b" "$DATA/val/class_0" --top-k 2 --out "$OUT/predictions.csv"

# --------------------------------------------------------------------------- 5: feature cache
FE=("${COMMON[@]}" strategy=feature_extract augment=none trainer.epochs=3)
step "5a feature_extract with the feature cache" 180 "$PY" -m transfer_cli train "${FE[@]}" "hydra.run.dir=$OUT/runs/fe_cache"
grep -h "feature cache\|cached .* features" "$OUT/runs/fe_cache/train.log" || RESULTS+=("FAIL  5a: the feature cache was not used")
step "5b feature_extract without it" 180 "$PY" -m transfer_cli train "${FE[@]}" trainer.cache_features=false "hydra.run.dir=$OUT/runs/fe_nocache"
step "5c cached == uncached (rel. tolerance 2%)" 60 "$PY" "$OUT/py/compare.py" "$OUT/runs/fe_cache" "$OUT/runs/fe_nocache" 0.02 status=finished

# --------------------------------------------------------------------------- 6: DDP
TORCHRUN=("$PY" -m torch.distributed.run --standalone)
step "6a torchrun --nproc_per_node=1" 240 "${TORCHRUN[@]}" --nproc_per_node=1 -m transfer_cli train "${COMMON[@]}" \
  strategy=gradual trainer.epochs=3 "hydra.run.dir=$OUT/runs/ddp1"
step "6b torchrun 2 processes, gloo, one device (DDP wrap per stage)" 300 env TRANSFER_DIST_BACKEND=gloo \
  "${TORCHRUN[@]}" --nproc_per_node=2 -m transfer_cli train "${COMMON[@]}" strategy=gradual trainer.epochs=3 \
  "hydra.run.dir=$OUT/runs/ddp2"
"$PY" - "$OUT/runs" <<'EOF'
import json, sys
from pathlib import Path
for name in ("ddp1", "ddp2"):
    f = Path(sys.argv[1]) / name / "summary.json"
    s = json.loads(f.read_text()) if f.is_file() else {}
    print(name, {k: s.get(k) for k in ("status", "world_size", "device", "amp", "best_val_acc", "train_images_per_s")})
EOF
NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)")
if [ "${NGPU:-0}" -ge 2 ]; then
  step "6c torchrun 2 processes, NCCL, 2 GPUs" 300 "${TORCHRUN[@]}" --nproc_per_node=2 -m transfer_cli train \
    "${COMMON[@]}" strategy=gradual trainer.epochs=3 "hydra.run.dir=$OUT/runs/ddp2_nccl"
else
  RESULTS+=("INFO  6c NCCL with 2 ranks skipped: $NGPU GPU(s) visible (NCCL refuses 2 ranks on one GPU)")
fi

# --------------------------------------------------------------------------- 7: bench-gpu
if [ "$DEVICE" = cuda ]; then
  step "7 transfer bench --gpu (make bench-gpu)" 300 "$PY" -m transfer_cli bench --gpu --out "$OUT/bench"
  step "7b bench_gpu.json sane" 30 "$PY" "$OUT/py/check_bench.py" "$OUT/bench/bench_gpu.json"
else
  # no CUDA: the same code path (benchmarks/gpu.py) on a tiny model, so a mistake in it shows before a GPU run
  RESULTS+=("SKIP  7 transfer bench --gpu: needs CUDA (DEVICE=$DEVICE); its code path runs on a tiny model instead")
  step "7 bench-gpu code path on CPU (tiny)" 300 "$PY" -c "
from transfer_cli.benchmarks import gpu as bench_gpu
print(bench_gpu.gpu_figures(device='cpu', models=('mobilenet_v3_small',), image_size=32, batch=4, warmup=1, steps=2, jpegs=16))"
fi

# --------------------------------------------------------------------------- 8: torch.compile (last; budget permitting)
if [ "$(elapsed)" -lt 400 ]; then
  step "8 torch.compile, gradual, ${COMPILE_BACKEND:-inductor}" $(( 560 - $(elapsed) )) env TORCH_LOGS=recompiles "$PY" "$OUT/py/compile_count.py" \
    backbone=timm backbone.name=test_resnet backbone.pretrained=false dataset=folder "dataset.root=$DATA" \
    transforms.image_size=32 "trainer.device=$DEVICE" "trainer.batch_size=$BS" trainer.num_workers=0 \
    optimizer.lr_scale=10 strategy=gradual trainer.epochs=4 trainer.compile=true "hydra.run.dir=$OUT/runs/compile" \
    2> "$OUT/compile.stderr"
  echo "recompiles: $(grep -c 'Recompiling function' "$OUT/compile.stderr")," \
       "recompile_limit hits: $(grep -c 'recompile_limit' "$OUT/compile.stderr")"
  grep -h "guard failure\|    - \|recompile_limit" "$OUT/compile.stderr" | sed -E 's/^.*\] //' | cut -c1-160 | sort | uniq -c | sort -rn | head -12
  RESULTS+=("INFO  8 compile: $(grep -c 'Recompiling function' "$OUT/compile.stderr") recompiles, $(grep -c 'recompile_limit' "$OUT/compile.stderr") recompile_limit hits")
else
  RESULTS+=("INFO  8 torch.compile skipped: $(elapsed)s used already")
fi

echo; echo "=================== summary ($(elapsed)s, outputs in $OUT)"
printf '%s\n' "${RESULTS[@]}"
printf '%s\n' "${RESULTS[@]}" > "$OUT/summary.txt"
! printf '%s\n' "${RESULTS[@]}" | grep -q '^FAIL'
