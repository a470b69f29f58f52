#!/usr/bin/env bash
# The GPU check (docs/gpu.md): install the pinned requirements, then run the CUDA tests, the training and
# evaluation speed benchmarks and a short real run on the bundled data, and print one summary table with the
# projected wall time of a full CORL-schedule run. Sized for about 6 minutes on one H200-class GPU, install
# included (an estimate: no GPU has run it yet).
#
#   bash benchmarks/gpu_check.sh               # on a CUDA machine
#   bash benchmarks/gpu_check.sh --dry_run     # the same steps on CPU with tiny sizes (what CI runs)
#
# Options:
#   --dry_run         CPU, tiny sizes, torch.compile off, and the install only checks that the pins are met
#                     (pip install --dry-run): it exercises this script, its figures mean nothing
#   --venv DIR        install into a fresh virtual environment DIR and run everything with its Python
#   --no_install      use the Python as it is (an environment prepared by hand, e.g. on a machine without network)
#   --wheels DIR      install from the wheels in DIR, without any package index
#   --steps A,B,...   run only these steps (the names in the table), e.g. again after a fix
#   --log_dir DIR     where each step's raw output goes (default: a new temporary folder)
#   --budget SECONDS  start no step after this much time and cut the last one short, so the table always prints
#   --python PY       the Python to install into and run with (default: python3, else python)
# Every step runs, whatever the others do; the exit status is 1 if one failed (or was not reached within the
# budget), else 0. Where $OUT is set, the logs are also packed into $OUT/gpu_check_logs.tar.gz after every step.
set -uo pipefail

ALL_STEPS=(install cuda_tests train_speed_fp32 train_speed_tf32 train_speed_bf16 train_speed_bf16_compile eval_speed
           train_run eval_only_cpu)
DRY_RUN=0 VENV="" INSTALL=1 WHEELS="" STEPS="" LOG_DIR="" BUDGET=0
PY=$(command -v python3 || command -v python)
while (($#)); do
    case $1 in
        --dry_run) DRY_RUN=1 ;;
        --no_install) INSTALL=0 ;;
        --venv|--wheels|--steps|--log_dir|--budget|--python)
            (($# >= 2)) || { echo "error: $1 needs a value" >&2; exit 2; }
            case $1 in
                --venv) VENV=$2 ;; --wheels) WHEELS=$2 ;; --steps) STEPS=$2 ;; --log_dir) LOG_DIR=$2 ;;
                --budget) BUDGET=$2 ;; --python) PY=$2 ;;
            esac
            shift ;;
        -h|--help) sed -n '2,/^set /p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "error: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
for step in ${STEPS//,/ }; do
    [[ " ${ALL_STEPS[*]} " == *" $step "* ]] || { echo "error: unknown step '$step'; the steps are ${ALL_STEPS[*]}" >&2; exit 2; }
done
[[ $BUDGET =~ ^[0-9]+$ ]] || { echo "error: --budget takes whole seconds, got '$BUDGET'" >&2; exit 2; }
[[ -n $PY ]] || { echo "error: no python3 or python on PATH; give --python" >&2; exit 2; }
for name in VENV WHEELS LOG_DIR PY; do  # paths given relative to where the script was called from
    [[ -n ${!name} && ${!name} != /* && ( $name != PY || ${!name} == */* ) ]] && printf -v "$name" '%s' "$PWD/${!name}"
done
LOG_DIR=${LOG_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")}
mkdir -p "$LOG_DIR" || exit 2
cd "$(dirname "$0")/.."  # the repository root
: > "$LOG_DIR/steps.tsv"
START=$SECONDS

export PYTHONUNBUFFERED=1 WANDB_MODE=${WANDB_MODE:-disabled}  # no wandb run unless asked for
if ((DRY_RUN)); then
    # CPU, also on a machine with a GPU; one thread: tiny sizes gain nothing from more, and on a busy machine
    # a second thread mostly waits for the first (3x the CPU time measured on a shared 2-core machine)
    export CUDA_VISIBLE_DEVICES="" OMP_NUM_THREADS=1
    DEVICE=cpu
    TRAIN_ARGS=(--batch_sizes 16 --updates 2 --transitions 5000 --profile 0)
    EVAL_ARGS=(--episodes 2 --horizon 20 --single_episodes 1 --workers 2)
    RUN_ARGS=(--update_steps 20 --eval_every 20 --log_every 10 --batch_size 16 --eval_episodes 2)
    COMPILE=false SPEED_COMPILE=()  # inductor on CPU takes about 30 s a graph
else
    DEVICE=cuda
    TRAIN_ARGS=(--batch_sizes 4096 --updates 30 --profile 5)
    EVAL_ARGS=(--episodes 100 --workers -1 --single_episodes 2)  # -1: a worker per 16 envs, at most one per core
    RUN_ARGS=(--update_steps 3000 --eval_every 3000)
    COMPILE=true SPEED_COMPILE=(--compile)
fi

selected() { [[ -z $STEPS || ",$STEPS," == *",$1,"* ]]; }

pack_logs() {  # the device machine's $OUT returns few files: one archive of the logs, checkpoints left out
    [[ -n ${OUT:-} && -d ${OUT:-} ]] || return 0
    tar -czf "$OUT/gpu_check_logs.tar.gz" -C "$LOG_DIR" --exclude='*.pt' --exclude=wandb . 2>/dev/null || true
}

run_step() {  # run_step NAME SECONDS COMMAND...: output to NAME.log, "NAME<TAB>exit status<TAB>seconds" to steps.tsv
    local name=$1 limit=$2
    shift 2
    selected "$name" || return 0
    if ((BUDGET)); then
        local left=$((BUDGET - (SECONDS - START) - 15))  # 15 s kept for the summary
        if ((left < 10)); then
            printf '%s\tbudget\t0\n' "$name" >> "$LOG_DIR/steps.tsv"
            echo "[$(date +%T)] $name: not started, the ${BUDGET} s budget is spent"
            return 0
        fi
        ((left < limit)) && limit=$left
    fi
    echo "[$(date +%T)] $name (at most ${limit} s) ..."
    local begin=$SECONDS
    timeout --kill-after=10 "$limit" "$@" > "$LOG_DIR/$name.log" 2>&1
    local status=$?
    printf '%s\t%s\t%s\n' "$name" "$status" "$((SECONDS - begin))" >> "$LOG_DIR/steps.tsv"
    echo "[$(date +%T)] $name: exit status $status after $((SECONDS - begin)) s"
    pack_logs
}

install_requirements() {  # in a child bash: its output goes to install.log
    set -e
    if [[ -n $VENV ]]; then
        "$BASE_PY" -m venv "$VENV"
        echo "made the virtual environment $VENV"
    fi
    local pip=("$PY" -m pip install --disable-pip-version-check --retries 2 --timeout 20 -r requirements.txt)
    [[ -n $WHEELS ]] && pip+=(--no-index --find-links "$WHEELS")
    ((DRY_RUN)) && pip+=(--dry-run)  # resolves the pins, changes nothing
    echo "${pip[*]}"
    "${pip[@]}"
}

BASE_PY=$PY
[[ -n $VENV ]] && PY=$VENV/bin/python
export PY BASE_PY VENV WHEELS DRY_RUN
export -f install_requirements
if ((INSTALL)); then
    run_step install 420 bash -c install_requirements
elif selected install; then
    printf 'install\tnot_run\t0\n' >> "$LOG_DIR/steps.tsv"
fi

# the CUDA tests live in tests/test_cuda.py: collecting the whole suite would import every optional package
run_step cuda_tests 300 "$PY" -m pytest -m cuda -q -rs -p no:cacheprovider --junitxml "$LOG_DIR/cuda_tests.xml" \
    tests/test_cuda.py
run_step train_speed_fp32 150 "$PY" benchmarks/train_speed.py --device "$DEVICE" "${TRAIN_ARGS[@]}" \
    --json "$LOG_DIR/train_speed_fp32.json"
run_step train_speed_tf32 150 "$PY" benchmarks/train_speed.py --device "$DEVICE" "${TRAIN_ARGS[@]}" --tf32 \
    --json "$LOG_DIR/train_speed_tf32.json"  # float32 on TF32 tensor cores: dt.py's tf32 field (docs/gpu.md)
run_step train_speed_bf16 150 "$PY" benchmarks/train_speed.py --device "$DEVICE" "${TRAIN_ARGS[@]}" --bf16 \
    --json "$LOG_DIR/train_speed_bf16.json"
run_step train_speed_bf16_compile 240 "$PY" benchmarks/train_speed.py --device "$DEVICE" "${TRAIN_ARGS[@]}" --bf16 \
    "${SPEED_COMPILE[@]}" --json "$LOG_DIR/train_speed_bf16_compile.json"
run_step eval_speed 240 "$PY" benchmarks/eval_speed.py --device "$DEVICE" "${EVAL_ARGS[@]}" \
    --json "$LOG_DIR/eval_speed.json"

# a locomotion config (paper-size model, batch 4096) on the bundled data, named as configs/dt/quickstart.yaml names it
QUICKSTART=$("$PY" -c 'import json, yaml; c = yaml.safe_load(open("configs/dt/quickstart.yaml"))
print(c["env_name"], c["dataset_path"], json.dumps(c["target_returns"]).replace(" ", ""))' 2> "$LOG_DIR/quickstart.err")
read -r QS_ENV QS_DATA QS_TARGETS <<< "$QUICKSTART"
[[ -s $LOG_DIR/quickstart.err ]] || rm -f "$LOG_DIR/quickstart.err"
selected train_run && rm -rf "$LOG_DIR/train_run"  # a new run (eval_only_cpu alone reuses its checkpoint)
selected eval_only_cpu && rm -rf "$LOG_DIR/eval_only_cpu"
run_step train_run 300 "$PY" algorithms/dt.py --config_path configs/dt/hopper/medium_replay_v2.yaml \
    --env_name "${QS_ENV:-unreadable}" --dataset_path "${QS_DATA:-unreadable}" --target_returns "${QS_TARGETS:-[1]}" \
    --device "$DEVICE" --bf16 true --fused_adamw true --compile "$COMPILE" "${RUN_ARGS[@]}" \
    --run_dir "$LOG_DIR/train_run"
run_step eval_only_cpu 240 "$PY" algorithms/dt.py --eval_checkpoint "$LOG_DIR/train_run" --device cpu \
    --runs_dir "$LOG_DIR/eval_only_cpu"

SUMMARY_ARGS=(--log_dir "$LOG_DIR")
((DRY_RUN)) && SUMMARY_ARGS+=(--dry_run)
"$PY" benchmarks/gpu_check_summary.py "${SUMMARY_ARGS[@]}" | tee "$LOG_DIR/summary.md"
status=${PIPESTATUS[0]}
if ((status > 1)); then  # the summary itself broke: the raw list of steps still says what happened
    echo "the summary failed (exit status $status); steps (name, exit status, seconds):"
    cat "$LOG_DIR/steps.tsv"
    status=1
fi
[[ -n ${OUT:-} && -d ${OUT:-} ]] && cp "$LOG_DIR/summary.md" "$OUT/gpu_check_summary.md"
pack_logs
exit "$status"
