# shellcheck shell=bash
# Shared launcher logic for the batch scripts in slurm/ (sourced, never executed).
#
# A batch script sets its defaults, sources this file and calls one of:
#   rlsd_launch_train CONFIG [overrides...]  one torchrun per node under srun (the main job)
#   rlsd_launch_single CMD [args...]          one task on one node (tools such as the converter)
#
# The pieces, in the order they run:
#   batch shell (first node of the allocation)
#     rlsd_setup            repository, output dir, rendezvous address/port, process counts,
#                           venv, NCCL / gloo defaults
#     rlsd_run_step         srun in the background; USR1/TERM to the batch shell are forwarded to
#                           srun (which delivers them to every process of the step on every node);
#                           waits for srun
#     rlsd_finish           COMPLETED -> exit 0; STOPPED -> scontrol requeue (while the job is
#                           still RUNNING, i.e. not cancelled/preempted/timed out); else the failure
#   every node (one srun task per node)
#     rlsd_node_main        picks the gloo/NCCL interface, starts torchrun with c10d rendezvous in
#                           the background with USR1/TERM ignored by the agent, forwards USR1/TERM
#                           to the worker processes itself, waits
#
# Why the agent ignores USR1 and TERM: Slurm delivers a step signal to every process of the step,
# torchrun's agent included. USR1's default action would kill the agent (and with it the workers
# in the middle of a step), and the agent's own TERM handler kills the workers after
# --shutdown-timeout (30 s). The workers themselves handle both signals (finish the step, save a
# checkpoint, write OUTPUT/STOPPED, exit 0), so the agent is told to stay out of the way
# (SIG_IGN inherited across exec, and TERM removed from torchrun's --signals-to-handle; INT, HUP
# and QUIT still stop it). A worker inherits the ignored dispositions until the trainer installs
# its handlers, so a signal during start-up does not kill it; the wrapper repeats the signal until
# torchrun ends, so it still takes effect once the handlers are in place.
#
# Environment variables (all optional; the batch scripts document the user-facing ones):
#   REPO_DIR          repository root (default: the sbatch submission directory)
#   OUTPUT_DIR        trainer.output_dir (default: outputs/slurm/<job name>-<job id>); holds
#                     checkpoints/, COMPLETED / STOPPED, metrics; the same across requeues
#   NPROC_PER_NODE    worker processes per node (default: GPUs on the node, 4 without GPUs)
#   RDZV_HOST         rendezvous node (default: first host of the allocation), RDZV_ADDR its
#                     address (default: the node's Slurm NodeAddr), RDZV_PORT (default:
#                     20000 + job id mod 20000)
#   VENV              virtualenv to activate on every node (default: REPO_DIR/.venv when it exists
#                     and no container is used); PYTHON (default: python)
#   CONTAINER_IMAGE   run every srun task in this pyxis/enroot image (srun --container-image);
#   CONTAINER_MOUNTS  its --container-mounts (default: REPO_DIR and OUTPUT_DIR's parent, same
#                     path inside), CONTAINER_WORKDIR (default: REPO_DIR), CONTAINER_NAME
#                     (named container, reused by later steps), CONTAINER_EXTRA_ARGS
#   SRUN_EXTRA_ARGS   extra srun flags (word-split), TORCHRUN_EXTRA_ARGS extra torchrun flags
#   REQUEUE_ON_STOP   1 (default): requeue the job when the trainer stopped on a signal
#   RLSD_SIGNAL_REPEAT_S  seconds between repeats of a stop signal to the workers (default 30)
#   NCCL_* / GLOO_SOCKET_IFNAME / TORCH_NCCL_* / CUDA_DEVICE_MAX_CONNECTIONS: see
#                     rlsd_comm_defaults; a value already set always wins.

rlsd_log() { printf '[rlsd %s] %s\n' "$(date +%H:%M:%S)" "$*"; }
rlsd_die() {
    printf '[rlsd %s] error: %s\n' "$(date +%H:%M:%S)" "$*" >&2
    exit 1
}

# ------------------------------------------------------------------------------------- setup
rlsd_setup() {
    [ -n "${SLURM_JOB_ID:-}" ] || rlsd_die "not inside a Slurm job: submit with sbatch (see slurm/README.md)"
    command -v srun >/dev/null || rlsd_die "srun not found on PATH"
    REPO_DIR=$(cd "${REPO_DIR:-${SLURM_SUBMIT_DIR:-$PWD}}" && pwd) || rlsd_die "REPO_DIR does not exist"
    [ -f "$REPO_DIR/megatron_rlsd/train.py" ] ||
        rlsd_die "REPO_DIR=$REPO_DIR is not the megatron_rlsd repository: submit from its root or set REPO_DIR"
    cd "$REPO_DIR" || exit 1
    export REPO_DIR

    NNODES=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
    RLSD_GPUS_PER_NODE=$(rlsd_gpus_on_node)
    if [ -z "${NPROC_PER_NODE:-}" ]; then
        if [ "$RLSD_GPUS_PER_NODE" -gt 0 ]; then NPROC_PER_NODE=$RLSD_GPUS_PER_NODE; else NPROC_PER_NODE=4; fi
    fi
    export NNODES NPROC_PER_NODE RLSD_GPUS_PER_NODE

    rlsd_setup_rendezvous
    rlsd_setup_venv
    rlsd_comm_defaults
}

# GPUs visible on this node: nvidia-smi if present, else what Slurm allocated, else 0.
rlsd_gpus_on_node() {
    local n=0
    if command -v nvidia-smi >/dev/null 2>&1; then
        n=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
    fi
    if [ "${n:-0}" -eq 0 ] && [[ "${SLURM_GPUS_ON_NODE:-}" =~ ^[0-9]+$ ]]; then
        n=$SLURM_GPUS_ON_NODE
    fi
    echo "${n:-0}"
}

# Rendezvous: the first host of the allocation hosts torchrun's c10d store. Hosts are reached by
# their Slurm NodeAddr (what slurmctld itself uses), so node names need not resolve in DNS.
rlsd_setup_rendezvous() {
    local nodelist=${SLURM_JOB_NODELIST:-${SLURM_NODELIST:-}} hosts
    hosts=$(scontrol show hostnames "$nodelist") || rlsd_die "scontrol show hostnames failed for '$nodelist'"
    RDZV_HOST=${RDZV_HOST:-$(head -n1 <<<"$hosts")}
    # NODE_ADDRS="name=addr ...": every node's NodeAddr, looked up once here with one RPC (scontrol
    # may be absent inside a container); rlsd_node_main finds its own entry
    NODE_ADDRS=$(scontrol show node -o "$nodelist" 2>/dev/null |
        sed -n 's/^NodeName=\([^ ]*\) .*NodeAddr=\([^ ]*\) .*/\1=\2/p' | tr '\n' ' ') || NODE_ADDRS=""
    if [ -z "${RDZV_ADDR:-}" ]; then
        RDZV_ADDR=$(rlsd_node_addr "$RDZV_HOST")
        RDZV_ADDR=${RDZV_ADDR:-$RDZV_HOST}
    fi
    RDZV_PORT=${RDZV_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
    RDZV_ID=${RDZV_ID:-$SLURM_JOB_ID}
    export RDZV_HOST RDZV_ADDR RDZV_PORT RDZV_ID NODE_ADDRS
}

rlsd_node_addr() {  # NAME -> its address from NODE_ADDRS (empty when unknown)
    local entry
    for entry in $NODE_ADDRS; do
        if [ "${entry%%=*}" = "$1" ]; then
            echo "${entry#*=}"
            return 0
        fi
    done
}

rlsd_setup_venv() {
    if [ -z "${VENV+set}" ] && [ -z "${CONTAINER_IMAGE:-}" ] && [ -f "$REPO_DIR/.venv/bin/activate" ]; then
        VENV=$REPO_DIR/.venv
    fi
    export VENV=${VENV:-} PYTHON=${PYTHON:-python}
}

# Communication defaults. NCCL finds HCAs and interfaces by itself; these are the knobs clusters
# usually pin, each exported only when set here or by the user (a user value always wins).
rlsd_comm_defaults() {
    export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
    # InfiniBand: restrict NCCL to these HCAs (e.g. "mlx5" or "=mlx5_0:1,mlx5_1:1"); unset = all.
    [ -n "${NCCL_IB_HCA:-}" ] && export NCCL_IB_HCA
    # IB verbs retry timeout exponent: 4.096 us * 2^22 ~ 17 s; fewer spurious aborts at scale.
    export NCCL_IB_TIMEOUT=${NCCL_IB_TIMEOUT:-22}
    # NCCL_IB_DISABLE=1 forces TCP sockets (clusters without IB); NCCL_IB_GID_INDEX for RoCE.
    [ -n "${NCCL_IB_DISABLE:-}" ] && export NCCL_IB_DISABLE
    [ -n "${NCCL_IB_GID_INDEX:-}" ] && export NCCL_IB_GID_INDEX
    # NCCL_SOCKET_IFNAME / GLOO_SOCKET_IFNAME: default per node = the interface that reaches the
    # rendezvous host (rlsd_node_main); set them to pin an interface.
    # Megatron-Core's TP communication overlap needs kernels queued in issue order.
    export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
    # fail a hung NCCL collective with an error instead of hanging until the time limit
    export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
    export PYTHONUNBUFFERED=1 # log lines reach the Slurm log when they are printed
}

# ------------------------------------------------------------------------------------- srun
# srun flags shared by every step: one task per node, the node's whole CPU set (srun would
# otherwise bind a task to 1 CPU under task/affinity or cgroups), kill the step when one node
# fails, and the container when CONTAINER_IMAGE is set.
rlsd_srun_args() {
    local nodes=$1 cpus=${SLURM_CPUS_ON_NODE:-}
    RLSD_SRUN_ARGS=(--nodes="$nodes" --ntasks="$nodes" --ntasks-per-node=1 --kill-on-bad-exit=1)
    [ -n "$cpus" ] && RLSD_SRUN_ARGS+=(--cpus-per-task="$cpus")
    if [ -n "${CONTAINER_IMAGE:-}" ]; then
        local mounts=${CONTAINER_MOUNTS:-$REPO_DIR:$REPO_DIR}
        if [ -z "${CONTAINER_MOUNTS:-}" ] && [ -n "${OUTPUT_DIR:-}" ]; then
            case "$OUTPUT_DIR" in "$REPO_DIR"/*) ;; *) mounts+=",$(dirname "$OUTPUT_DIR"):$(dirname "$OUTPUT_DIR")" ;; esac
        fi
        RLSD_SRUN_ARGS+=(--container-image="$CONTAINER_IMAGE" --container-mounts="$mounts"
            --container-workdir="${CONTAINER_WORKDIR:-$REPO_DIR}")
        [ -n "${CONTAINER_NAME:-}" ] && RLSD_SRUN_ARGS+=(--container-name="$CONTAINER_NAME")
        # shellcheck disable=SC2206  # word splitting intended
        [ -n "${CONTAINER_EXTRA_ARGS:-}" ] && RLSD_SRUN_ARGS+=($CONTAINER_EXTRA_ARGS)
    fi
    # shellcheck disable=SC2206
    [ -n "${SRUN_EXTRA_ARGS:-}" ] && RLSD_SRUN_ARGS+=($SRUN_EXTRA_ARGS)
    return 0
}

# Run `srun ARGS... CMD...` in the background and wait for it, forwarding USR1 / TERM that reach
# the batch shell (`#SBATCH --signal=B:USR1@900`, `scancel --signal=USR1 --batch`) to srun, which
# passes them to every process of the step. Returns srun's exit status.
rlsd_run_step() {
    RLSD_STEP_PID=""
    trap 'rlsd_forward_to_step USR1' USR1
    trap 'rlsd_forward_to_step TERM' TERM
    srun "${RLSD_SRUN_ARGS[@]}" "$@" &
    RLSD_STEP_PID=$!
    local rc=0
    rlsd_wait_pid "$RLSD_STEP_PID" || rc=$?
    trap - USR1 TERM
    return $rc
}

rlsd_forward_to_step() {
    RLSD_TRAPPED=1
    if [ -n "${RLSD_STEP_PID:-}" ] && kill -0 "$RLSD_STEP_PID" 2>/dev/null; then
        rlsd_log "batch shell got SIG$1: forwarding it to the job step (srun pid $RLSD_STEP_PID)"
        kill -s "$1" "$RLSD_STEP_PID" 2>/dev/null || true
    else
        rlsd_log "batch shell got SIG$1 with no job step running"
    fi
}

# wait PID, resuming after trapped signals (a trap makes `wait` return early, >128); returns the
# process's exit status.
rlsd_wait_pid() {
    local pid=$1 rc
    while :; do
        RLSD_TRAPPED=0
        rc=0
        wait "$pid" || rc=$?
        [ "$RLSD_TRAPPED" = 1 ] || return "$rc"
        kill -0 "$pid" 2>/dev/null && continue
        # signalled, and the process ended meanwhile: bash kept its status for the next wait
        local rc2=0
        wait "$pid" 2>/dev/null || rc2=$?
        [ "$rc2" -ne 127 ] && rc=$rc2
        return "$rc"
    done
}

# ------------------------------------------------------------------------------------- the main job
# rlsd_launch_train CONFIG [overrides...]: the whole job (setup, srun + torchrun on every node,
# requeue decision). Extra overrides also come from EXTRA_ARGS (word-split).
rlsd_launch_train() {
    local config=$1
    shift
    rlsd_setup
    local -a overrides=("$@") extra=()
    # EXTRA_ARGS: whitespace-separated overrides (no globbing, no quoting)
    [ -n "${EXTRA_ARGS:-}" ] && read -ra extra <<<"$EXTRA_ARGS"
    overrides+=(${extra[@]+"${extra[@]}"})
    # an explicit trainer.output_dir override decides where the markers are looked for
    local o
    # ${a[@]+"${a[@]}"}: an empty array under `set -u` on bash < 4.4
    for o in ${overrides[@]+"${overrides[@]}"}; do
        case "$o" in trainer.output_dir=*) OUTPUT_DIR=${o#trainer.output_dir=} ;; esac
    done
    OUTPUT_DIR=${OUTPUT_DIR:-$REPO_DIR/outputs/slurm/${SLURM_JOB_NAME:-rlsd}-$SLURM_JOB_ID}
    case "$OUTPUT_DIR" in /*) ;; *) OUTPUT_DIR=$REPO_DIR/$OUTPUT_DIR ;; esac
    mkdir -p "$OUTPUT_DIR" || rlsd_die "cannot create OUTPUT_DIR=$OUTPUT_DIR"
    export OUTPUT_DIR
    # markers of an earlier run must not decide this run's fate (the trainer clears them too,
    # but only once it got that far)
    rm -f "$OUTPUT_DIR/COMPLETED" "$OUTPUT_DIR/STOPPED"

    rlsd_log "job $SLURM_JOB_ID (${SLURM_JOB_NAME:-}) restart ${SLURM_RESTART_COUNT:-0}: $NNODES node(s)" \
        "[${SLURM_JOB_NODELIST:-}] x $NPROC_PER_NODE process(es), GPUs/node $RLSD_GPUS_PER_NODE"
    rlsd_log "config $config, output $OUTPUT_DIR, rendezvous $RDZV_HOST ($RDZV_ADDR:$RDZV_PORT) id $RDZV_ID"
    [ -n "${CONTAINER_IMAGE:-}" ] && rlsd_log "container $CONTAINER_IMAGE"

    rlsd_srun_args "$NNODES"
    local rc=0
    # shellcheck disable=SC2016  # expanded by the per-node bash
    rlsd_run_step bash -c '. "$REPO_DIR/slurm/lib.sh" && rlsd_node_main "$@"' rlsd-node \
        -m megatron_rlsd.train --config "$config" "trainer.output_dir=$OUTPUT_DIR" ${overrides[@]+"${overrides[@]}"} ||
        rc=$?
    rlsd_finish "$rc"
}

# rlsd_finish RC: decide the job's end from the trainer's markers.
rlsd_finish() {
    local rc=$1
    if [ -f "$OUTPUT_DIR/COMPLETED" ]; then
        rlsd_log "training completed (OUTPUT_DIR/COMPLETED)"
        exit 0
    fi
    if [ -f "$OUTPUT_DIR/STOPPED" ]; then
        # requeue only a job Slurm still runs: after `scancel` (CANCELLED), a preemption
        # (PREEMPTED; Slurm requeues itself under PreemptMode=REQUEUE) or the time limit (TIMEOUT)
        # the job must end, and `scontrol requeue` would even revive a cancelled job
        local state
        state=$(scontrol show job -o "$SLURM_JOB_ID" 2>/dev/null | tr ' ' '\n' | sed -n 's/^JobState=//p') || state=""
        if [ "${REQUEUE_ON_STOP:-1}" != 1 ]; then
            rlsd_log "training stopped on a signal with a checkpoint; REQUEUE_ON_STOP=0: not requeueing"
        elif [ "$state" = RUNNING ]; then
            rlsd_log "training stopped on a signal with a checkpoint: requeueing job $SLURM_JOB_ID"
            scontrol requeue "$SLURM_JOB_ID" || rlsd_log "scontrol requeue failed"
        else
            rlsd_log "training stopped on a signal with a checkpoint; job state ${state:-unknown}: not requeueing"
        fi
        exit 0
    fi
    [ "$rc" -eq 0 ] && rc=1 # ended without a marker: not a success whatever the exit code says
    rlsd_log "training failed (exit status $rc, no COMPLETED/STOPPED marker in $OUTPUT_DIR)"
    exit "$rc"
}

# ------------------------------------------------------------------------------------- per node
# rlsd_node_main TORCHRUN_SCRIPT_ARGS...: runs once per node as the srun task.
rlsd_node_main() {
    local node=${SLURMD_NODENAME:-$(hostname -s)} node_rank=${SLURM_NODEID:-0}
    cd "$REPO_DIR" || exit 1
    if [ -n "${VENV:-}" ]; then
        # shellcheck disable=SC1091
        . "$VENV/bin/activate" || rlsd_die "cannot activate VENV=$VENV on $node"
    fi
    local node_addr is_host=0
    node_addr=$(rlsd_node_addr "$node")
    [ "$node" = "$RDZV_HOST" ] && is_host=1
    # the interface toward the rendezvous host carries gloo (and NCCL's bootstrap)
    local iface
    iface=$(rlsd_iface_to "$RDZV_ADDR")
    if [ -n "$iface" ]; then
        export GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-$iface}
        export NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-$iface}
    fi
    # torchrun's agent: TERM is not among the signals it handles (see the top of this file)
    export PET_SIGNALS_TO_HANDLE=SIGINT,SIGHUP,SIGQUIT TORCHELASTIC_SIGNALS_TO_HANDLE=SIGINT,SIGHUP,SIGQUIT

    local -a torchrun=("$PYTHON" -m torch.distributed.run
        --nnodes="$NNODES" --nproc-per-node="$NPROC_PER_NODE"
        --rdzv-backend=c10d --rdzv-endpoint="$RDZV_ADDR:$RDZV_PORT" --rdzv-id="$RDZV_ID"
        --rdzv-conf="is_host=$is_host" --max-restarts=0)
    [ -n "$node_addr" ] && torchrun+=(--local-addr="$node_addr")
    # shellcheck disable=SC2206
    [ -n "${TORCHRUN_EXTRA_ARGS:-}" ] && torchrun+=($TORCHRUN_EXTRA_ARGS)
    rlsd_log "node $node_rank/$NNODES: $node addr ${node_addr:-?} host $(hostname)" \
        "iface ${GLOO_SOCKET_IFNAME:-auto}$([ $is_host = 1 ] && echo ', rendezvous host'):" \
        "${torchrun[*]} $*"

    # the agent starts with USR1 and TERM ignored; the workers install their own handlers
    (
        trap '' USR1 TERM
        exec "${torchrun[@]}" "$@"
    ) &
    RLSD_AGENT_PID=$!
    RLSD_REPEAT_PID=""
    trap 'rlsd_forward_to_workers USR1' USR1
    trap 'rlsd_forward_to_workers TERM' TERM
    local rc=0
    rlsd_wait_pid "$RLSD_AGENT_PID" || rc=$?
    trap - USR1 TERM
    if [ -n "$RLSD_REPEAT_PID" ]; then
        # shellcheck disable=SC2046  # the repeater and its sleep
        kill "$RLSD_REPEAT_PID" $(rlsd_children "$RLSD_REPEAT_PID") 2>/dev/null
    fi
    rlsd_log "node $node_rank/$NNODES: $node: torchrun exited with status $rc"
    return $rc
}

# Deliver a signal to the workers (the agent's children). Slurm usually signals them directly as
# well; a second delivery only sets the same flag again. A worker that is still starting ignores
# the signal (the inherited SIG_IGN lasts until the trainer installs its handlers), so the signal
# is repeated every RLSD_SIGNAL_REPEAT_S (30) seconds until torchrun ends.
rlsd_forward_to_workers() {
    RLSD_TRAPPED=1
    rlsd_log "${SLURMD_NODENAME:-$(hostname -s)}: got SIG$1, forwarding to workers:" \
        "$(rlsd_signal_workers "$1")"
    if [ -z "${RLSD_REPEAT_PID:-}" ]; then
        (
            trap - USR1 TERM
            # sleep off the task's stdout: a left-over sleep holding it would keep srun waiting
            while sleep "${RLSD_SIGNAL_REPEAT_S:-30}" >/dev/null 2>&1 && kill -0 "$RLSD_AGENT_PID" 2>/dev/null; do
                rlsd_signal_workers "$1" >/dev/null
            done
        ) &
        RLSD_REPEAT_PID=$!
    fi
    return 0
}

rlsd_signal_workers() {  # SIG -> signals the agent's children, prints their pids
    local pids
    pids=$(rlsd_children "$RLSD_AGENT_PID" | tr '\n' ' ')
    # shellcheck disable=SC2086  # a list of pids
    [ -n "${pids// /}" ] && kill -s "$1" $pids 2>/dev/null
    echo "${pids:-none}"
}

rlsd_children() {  # PID -> pids of its direct children (from /proc; no procps needed)
    local stat_file stat pid fields
    for stat_file in /proc/[0-9]*/stat; do
        { read -r stat <"$stat_file"; } 2>/dev/null || continue # gone meanwhile
        pid=${stat%% *}
        read -ra fields <<<"${stat##*) }" # state ppid ...
        [ "${fields[1]}" = "$1" ] && echo "$pid"
    done
    return 0
}

# The network interface this node uses to reach ADDR; on the host that owns ADDR, the interface
# holding it (loopback only when ADDR itself is a loopback address). Empty without iproute2.
rlsd_iface_to() {
    command -v ip >/dev/null 2>&1 || return 0
    local addr=$1 dev
    dev=$(ip -o route get "$addr" 2>/dev/null | sed -n 's/.* dev \([^ ]*\).*/\1/p' | head -n1)
    if [ "$dev" = lo ] && [[ "$addr" != 127.* ]]; then
        dev=$(ip -o addr show | awk -v a="$addr" '{split($4, p, "/"); if (p[1] == a) {print $2; exit}}')
    fi
    echo "$dev"
}

# ------------------------------------------------------------------------------------- one task
# rlsd_launch_single CMD [args...]: one srun task on the first node with the same repository,
# venv and container handling (tools such as convert_hf_to_megatron.py).
rlsd_launch_single() {
    rlsd_setup
    rlsd_srun_args 1
    rlsd_log "job $SLURM_JOB_ID on ${SLURM_JOB_NODELIST:-?}: $*"
    local rc=0
    # shellcheck disable=SC2016
    rlsd_run_step bash -c 'cd "$REPO_DIR" && { [ -z "$VENV" ] || . "$VENV/bin/activate"; } && exec "$@"' \
        rlsd-task "$@" || rc=$?
    rlsd_log "exit status $rc"
    exit "$rc"
}
