#!/usr/bin/env bash
# The GPU check: the gpu_* benchmarks (ours and PyTorch on the same GPU) and the
# model-equivalence and attention tests on the GPU, into one JSON file.
#
#   scripts/gpu_check.sh [OUT.json]        (default gpu_check.json)
#
# Needs only what a CUDA machine with jax[cuda], flax, optax, orbax, transformers, torch,
# peft and pytest has: the package runs from this checkout (PYTHONPATH), nothing is installed.
# Parts run in order of value within GPU_CHECK_SECONDS (default 480): each gets at most its
# own cap and what is left of the total; a part that fails or runs out of time is recorded
# as such and the rest still run. The JSON is rewritten after every part, so an interrupted
# check keeps what it measured.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
out=${1:-gpu_check.json}
python=${PYTHON:-python3}
total=${GPU_CHECK_SECONDS:-480}
params=${GPU_PARAMS:-'{"warmup": 1, "repeats": 3}'}  # bench.py --gpu-params for every benchmark
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
start=$(date +%s)

remaining() { echo $((total - ($(date +%s) - start))); }

# part NAME CAP COMMAND...: run COMMAND with a timeout, keep its exit code, seconds and log tail.
part() {
  local name=$1 cap=$2 left budget t0 rc
  shift 2
  left=$(remaining)
  budget=$((cap < left ? cap : left))
  if ((budget < 20)); then
    echo "{\"part\": \"$name\", \"skipped\": \"no time left of ${total}s\"}" >"$work/$name.status"
    return
  fi
  echo "== $name (up to ${budget}s)" >&2
  t0=$(date +%s)
  timeout "$budget" "$@" >"$work/$name.log" 2>&1
  rc=$?
  tail -n 30 "$work/$name.log" >&2
  "$python" - "$name" "$rc" "$(($(date +%s) - t0))" "$budget" "$work/$name.log" >"$work/$name.status" <<'EOF'
import json, sys
name, rc, seconds, budget, log = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
text = open(log, encoding="utf-8", errors="replace").read()
print(json.dumps({"part": name, "exit_code": rc, "seconds": seconds, "timed_out": rc == 124,
                  "budget_seconds": budget, "log_tail": text[-3000:] if rc else text[-600:]}))
EOF
  collect
}

# One JSON: machine, every benchmark row, the tests' summary line and each part's status.
collect() {
  "$python" - "$work" "$out" <<'EOF'
import glob, json, os, sys
work, out = sys.argv[1], sys.argv[2]
report = {"machine": None, "results": [], "parts": []}
for path in sorted(glob.glob(os.path.join(work, "*.json"))):
    data = json.load(open(path))
    report["machine"] = report["machine"] or data.get("machine")
    report["results"].extend(data.get("results", []))
for path in sorted(glob.glob(os.path.join(work, "*.status"))):
    report["parts"].append(json.load(open(path)))
tests = os.path.join(work, "tests.log")
if os.path.exists(tests):
    lines = [l for l in open(tests, errors="replace").read().splitlines() if " passed" in l or " failed" in l]
    report["tests"] = lines[-1] if lines else None
tmp = out + ".tmp"
json.dump(report, open(tmp, "w"), indent=2)
os.replace(tmp, out)
EOF
}

# part NAME CAP python scripts/bench.py NAME ... (timeout runs commands, not shell functions)
for name_cap in gpu_train:200 tests:120 gpu_decode:80 gpu_npo:90 gpu_ssd:80 gpu_vl:120; do
  name=${name_cap%%:*} cap=${name_cap##*:}
  if [[ $name == tests ]]; then
    part tests "$cap" env JAX_PLATFORMS="${GPU_CHECK_PLATFORMS:-cuda}" XLA_FLAGS= "$python" -m pytest -q \
      -p no:cacheprovider tests/test_attention.py tests/test_llama.py tests/test_qwen2_5_vl.py
  else
    part "$name" "$cap" "$python" scripts/bench.py "$name" --json "$work/$name.json" --gpu-params "$params"
  fi
done
collect
echo "wrote $out ($(($(date +%s) - start))s)" >&2
