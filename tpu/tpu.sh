#!/usr/bin/env bash
# offside-jax on a Cloud TPU VM or pod slice: create, install, launch, logs, stop, delete.
#
#   tpu/tpu.sh [options] <command>...     (commands run in the order given)
#
# Commands
#   create    create the TPU VM / slice (gcloud compute tpus tpu-vm create)
#   install   build the offside-jax wheel here, copy it to every worker, install it with jax[tpu]
#   launch    copy --config (and --data) to every worker, start the same command on all of them
#   logs      stream process 0's log (worker 0)
#   stop      stop the run on every worker (the pid each launch recorded)
#   delete    delete the TPU VM / slice
#
# Options (environment variables in brackets)
#   --name NAME          TPU name [TPU_NAME]                       (required)
#   --zone ZONE          zone, e.g. us-central2-b [TPU_ZONE]       (required)
#   --type TYPE          accelerator type: v4-8, v4-16, v5e-8 (= v5litepod-8), v5e-16, v5p-8,
#                        v5p-64, v6e-8 ... [TPU_TYPE, default v4-8]
#   --version VERSION    TPU software version [TPU_VERSION, default chosen by generation]
#   --project PROJECT    GCP project [TPU_PROJECT, default: gcloud's]
#   --spot               create Spot capacity
#   --config FILE        experiment config (YAML) to run                 (launch)
#   --command CMD        offside-jax command to run [finetune]           (launch)
#   --data GS_URL        gs:// file or folder copied into the run folder on every worker (launch)
#   --mesh PRESET        mesh preset overrides: v4-8, v5e-8, v5e-16, v5p-8, multihost (launch)
#   --set KEY=VALUE      a config override, repeatable (launch)
#   --run-dir DIR        run folder on the workers [offside-run, under the home folder]
#   --dry-run            print the exact commands instead of running them
#   -h, --help           this help
#
# Example (a 2-worker v4-16 slice; drop --dry-run to do it):
#   tpu/tpu.sh --dry-run --name offside --zone us-central2-b --type v4-16 \
#       --config configs/finetune_tiny.yaml --mesh multihost \
#       --set checkpoint.directory=gs://my-bucket/offside/ckpt create install launch logs
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

NAME="${TPU_NAME:-}"
ZONE="${TPU_ZONE:-}"
TYPE="${TPU_TYPE:-v4-8}"
VERSION="${TPU_VERSION:-}"
PROJECT="${TPU_PROJECT:-}"
SPOT=0
CONFIG=""
RUN_COMMAND="finetune"
DATA=""
MESH=""
RUN_DIR="offside-run"
DRY_RUN=0
OVERRIDES=()
COMMANDS=()

die() {
  echo "tpu.sh: $*" >&2
  exit 2
}

usage() {
  sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'
}

# One argument as the shell reads it back: bare when safe, else in single quotes.
quote() {
  if [[ "$1" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

# Print a command exactly (copy-pasteable) in --dry-run mode, else run it.
run() {
  if [[ "${DRY_RUN}" == 1 ]]; then
    local line="" arg
    for arg in "$@"; do
      line+="$(quote "${arg}") "
    done
    echo "${line% }"
  else
    "$@"
  fi
}

# The gcloud accelerator type (v5e-N is called v5litepod-N by gcloud).
accelerator_type() {
  case "$1" in
    v5e-*) echo "v5litepod-${1#v5e-}" ;;
    *) echo "$1" ;;
  esac
}

# Chips and hosts (workers) of an accelerator type.
chips_of() {
  local type generation size
  type="$(accelerator_type "$1")"
  generation="${type%-*}"
  size="${type##*-}"
  [[ "${size}" =~ ^[0-9]+$ ]] || die "cannot read the size of accelerator type '$1'"
  case "${generation}" in
    v2 | v3 | v4 | v5p) echo $((size / 2)) ;;  # the number counts TensorCores: 2 per chip
    v5litepod | v6e) echo "${size}" ;;            # the number counts chips
    *) die "unknown TPU generation in '$1' (v2, v3, v4, v5e/v5litepod, v5p, v6e)" ;;
  esac
}

workers_of() {
  local type generation chips
  type="$(accelerator_type "$1")"
  generation="${type%-*}"
  chips="$(chips_of "$1")"
  case "${generation}" in
    v2 | v3) echo $(((chips + 3) / 4)) ;;
    v4 | v5p) echo $(((chips + 3) / 4)) ;;
    v5litepod | v6e) if ((chips <= 8)); then echo 1; else echo $((chips / 4)); fi ;;
  esac
}

default_version() {
  case "$(accelerator_type "$1")" in
    v4-*) echo "tpu-ubuntu2204-base" ;;
    v5litepod-*) echo "v2-alpha-tpuv5-lite" ;;
    v5p-*) echo "v2-alpha-tpuv5" ;;
    v6e-*) echo "v2-alpha-tpuv6e" ;;
    *) echo "tpu-vm-base" ;;
  esac
}

# Mesh overrides of a preset (see tpu/README.md, "Mesh presets").
mesh_overrides() {
  case "$1" in
    v4-8 | v5p-8) echo "mesh.data=1 mesh.fsdp=4 mesh.tensor=1" ;;
    v5e-8) echo "mesh.data=1 mesh.fsdp=8 mesh.tensor=1" ;;
    v5e-16) echo "mesh.data=1 mesh.fsdp=16 mesh.tensor=1" ;;
    multihost) echo "mesh.data=1 mesh.fsdp=-1 mesh.tensor=1" ;;
    *) die "unknown mesh preset '$1' (v4-8, v5e-8, v5e-16, v5p-8, multihost)" ;;
  esac
}

gcloud_tpu() {
  local args=(gcloud compute tpus tpu-vm "$@" --zone "${ZONE}")
  [[ -n "${PROJECT}" ]] && args+=(--project "${PROJECT}")
  run "${args[@]}"
}

# Run a shell command on every worker, or on one (ssh_workers all|N COMMAND).
ssh_workers() {
  gcloud_tpu ssh "${NAME}" --worker="$1" --command "$2"
}

cmd_create() {
  local args=(create "${NAME}" --accelerator-type "$(accelerator_type "${TYPE}")" --version "${VERSION:-$(default_version "${TYPE}")}")
  ((SPOT)) && args+=(--spot)
  echo "# ${TYPE}: $(chips_of "${TYPE}") chips on $(workers_of "${TYPE}") worker(s)"
  gcloud_tpu "${args[@]}"
}

cmd_install() {
  local version wheel
  version="$(sed -n 's/^version = "\(.*\)"/\1/p' "${REPO_ROOT}/pyproject.toml")"
  wheel="offside_jax-${version}-py3-none-any.whl"
  run python3 -m pip wheel --no-deps --wheel-dir "${REPO_ROOT}/dist" "${REPO_ROOT}"
  gcloud_tpu scp "${REPO_ROOT}/dist/${wheel}" "${NAME}:" --worker=all
  # jax[tpu] brings libtpu; gcsfs lets orbax and the data path read and write gs:// URLs.
  ssh_workers all "python3 -m venv ~/offside-venv && ~/offside-venv/bin/pip install -q -U pip && ~/offside-venv/bin/pip install -q 'jax[tpu]>=0.10.2' gcsfs ~/${wheel}"
}

cmd_launch() {
  [[ -n "${CONFIG}" ]] || die "launch needs --config FILE"
  [[ "${DRY_RUN}" == 1 || -f "${CONFIG}" ]] || die "config file '${CONFIG}' not found"
  local overrides=() quoted="" override
  if [[ -n "${MESH}" ]]; then
    read -r -a overrides <<<"$(mesh_overrides "${MESH}")"
  fi
  overrides+=("${OVERRIDES[@]+"${OVERRIDES[@]}"}" "distributed.mode=on")
  for override in "${overrides[@]}"; do
    quoted+="$(quote "${override}") "
  done
  ssh_workers all "mkdir -p ~/${RUN_DIR}"
  gcloud_tpu scp "${CONFIG}" "${NAME}:~/${RUN_DIR}/config.yaml" --worker=all
  if [[ -n "${DATA}" ]]; then
    ssh_workers all "gcloud storage cp -r ${DATA} ~/${RUN_DIR}/"
  fi
  # Every worker runs the same command; JAX's cluster detection joins them (distributed.mode=on).
  ssh_workers all "cd ~/${RUN_DIR} && nohup ~/offside-venv/bin/offside-jax ${RUN_COMMAND} --config config.yaml ${quoted% } > run.log 2>&1 < /dev/null & echo \$! > ~/${RUN_DIR}/run.pid"
}

cmd_logs() {
  ssh_workers 0 "tail -n +1 -f ~/${RUN_DIR}/run.log"
}

cmd_stop() {
  ssh_workers all "test -f ~/${RUN_DIR}/run.pid && kill \$(cat ~/${RUN_DIR}/run.pid) || true"
}

cmd_delete() {
  gcloud_tpu delete "${NAME}" --quiet
}

while (($#)); do
  case "$1" in
    --name) NAME="${2:?--name needs a value}"; shift 2 ;;
    --zone) ZONE="${2:?--zone needs a value}"; shift 2 ;;
    --type) TYPE="${2:?--type needs a value}"; shift 2 ;;
    --version) VERSION="${2:?--version needs a value}"; shift 2 ;;
    --project) PROJECT="${2:?--project needs a value}"; shift 2 ;;
    --spot) SPOT=1; shift ;;
    --config) CONFIG="${2:?--config needs a value}"; shift 2 ;;
    --command) RUN_COMMAND="${2:?--command needs a value}"; shift 2 ;;
    --data) DATA="${2:?--data needs a value}"; shift 2 ;;
    --mesh) MESH="${2:?--mesh needs a value}"; shift 2 ;;
    --set) OVERRIDES+=("${2:?--set needs KEY=VALUE}"); shift 2 ;;
    --run-dir) RUN_DIR="${2:?--run-dir needs a value}"; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h | --help) usage; exit 0 ;;
    create | install | launch | logs | stop | delete) COMMANDS+=("$1"); shift ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done

((${#COMMANDS[@]})) || { usage; die "no command given"; }
[[ -n "${NAME}" ]] || die "--name (or TPU_NAME) is required"
[[ -n "${ZONE}" ]] || die "--zone (or TPU_ZONE) is required"
chips_of "${TYPE}" >/dev/null
[[ -z "${MESH}" ]] || mesh_overrides "${MESH}" >/dev/null
[[ "${DRY_RUN}" == 1 ]] || command -v gcloud >/dev/null || die "gcloud is not installed (https://cloud.google.com/sdk)"

for command in "${COMMANDS[@]}"; do
  "cmd_${command}"
done
