# Shared by every example's sbatch script (sourced from the repository root). Defines mgsr_slurm_train.
#
#   mgsr_slurm_train CONFIG [--section.field=value ...]
#
# Launch modes (MGSR_LAUNCH):
#   torchrun (default)  one `torchrun` per node through `srun`, c10d rendezvous on the first host of the
#                       job, --nnodes $SLURM_NNODES, --nproc-per-node = GPUs per node (MGSR_NPROC_PER_NODE,
#                       else SLURM_GPUS_ON_NODE, else SLURM_CPUS_PER_TASK for CPU runs);
#   direct              `srun` starts one task per rank; ranks come from SLURM_PROCID/SLURM_NTASKS (the job
#                       must then be allocated with --ntasks-per-node = ranks per node).
# Preemption: the job is submitted with --signal=B:USR1@120, so only this batch shell gets USR1 (or TERM)
# two minutes before the end. The trap forwards USR1 to every process of the running step with
# `scancel --signal=USR1` (never `kill` srun with TERM: srun then SIGKILLs the step and no handler runs).
# torchrun itself ignores USR1 (it would otherwise die of it and the step would be killed); its workers
# catch it, save a checkpoint at the next step boundary and exit with 115. After USR1 the batch shell
# requeues the job (MGSR_REQUEUE=0 turns that off) and exits with 115; the requeued job runs with
# --resume auto. TERM (scancel, SLURM preemption) also reaches every rank directly: they save and exit 115,
# and the shell exits 115 without requeueing.

MGSR_EXIT_PREEMPTED=115

_mgsr_forward_signal() {
    echo "mgsr-slurm: got SIG$1 in the batch shell: asking every rank to checkpoint and stop" >&2
    mgsr_preempted=1
    # USR1 is the time-limit warning (--signal=B:USR1@120): come back. TERM is a cancel or SLURM's own
    # preemption (which requeues by itself when PreemptMode=REQUEUE): do not requeue from here.
    [ "$1" = USR1 ] && mgsr_requeue=1
    scancel --signal=USR1 "$SLURM_JOB_ID"
}

mgsr_slurm_train() {
    local config=$1
    shift
    local python=${MGSR_PYTHON:-python}
    local nproc=${MGSR_NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-${SLURM_CPUS_PER_TASK:-1}}}
    MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
    MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
    export MASTER_ADDR MASTER_PORT
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
    echo "mgsr-slurm: job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST:" \
         "${MGSR_LAUNCH:-torchrun} mode, $SLURM_NNODES node(s) x $nproc process(es)," \
         "rendezvous $MASTER_ADDR:$MASTER_PORT" >&2
    mgsr_preempted=0 mgsr_requeue=0
    trap '_mgsr_forward_signal USR1' USR1
    trap '_mgsr_forward_signal TERM' TERM
    local train=(-m mgsr_megatron train --config "$config" --resume auto "$@")
    if [ "${MGSR_LAUNCH:-torchrun}" = direct ]; then
        srun --kill-on-bad-exit=0 "$python" "${train[@]}" &
    else
        srun --kill-on-bad-exit=0 --nodes="$SLURM_NNODES" --ntasks="$SLURM_NNODES" --ntasks-per-node=1 \
            bash -c 'trap "" USR1; exec "$@"' mgsr-torchrun \
            "$python" -m torch.distributed.run --nnodes="$SLURM_NNODES" --nproc-per-node="$nproc" \
            --rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv-id="$SLURM_JOB_ID" \
            --max-restarts=0 "${train[@]}" &
    fi
    local srun_pid=$! rc=0
    # `wait` returns early (status > 128) whenever a trapped signal arrives: wait again until srun ends.
    while true; do
        wait "$srun_pid"
        rc=$?
        kill -0 "$srun_pid" 2>/dev/null || break
    done
    if [ "$rc" -eq "$MGSR_EXIT_PREEMPTED" ] || [ "$mgsr_preempted" -eq 1 ]; then
        # direct mode returns the ranks' 115; under torchrun a rank's 115 is reported as a failure (1)
        echo "mgsr-slurm: preempted (srun exit $rc): checkpoint written, exit $MGSR_EXIT_PREEMPTED" >&2
        if [ "$mgsr_requeue" = 1 ] && [ "${MGSR_REQUEUE:-1}" = 1 ]; then
            echo "mgsr-slurm: requeueing job $SLURM_JOB_ID" >&2
            scontrol requeue "$SLURM_JOB_ID"
        fi
        return "$MGSR_EXIT_PREEMPTED"
    fi
    return "$rc"
}
