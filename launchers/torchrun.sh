#!/usr/bin/env bash
# Run any `r1mega` subcommand on NPROC processes of this node under torchrun
# (`python -m torch.distributed.run`); launchers/slurm.sbatch runs it once per node.
#
#   NPROC=2 bash launchers/torchrun.sh train --set parallel.tp=2
#   DRY_RUN=1 NPROC=8 bash launchers/torchrun.sh train --set parallel.tp=8    # the per-rank plan only
#
# Environment (all optional):
#   NPROC        processes on this node; default: the CUDA devices torch sees (CUDA_VISIBLE_DEVICES
#                respected), 1 without CUDA.
#   NNODES       nodes in the job (default 1). With 1, torchrun's standalone rendezvous on a free
#                local port; with more, its static rendezvous at MASTER_ADDR:MASTER_PORT, so that
#                global rank = NODE_RANK * NPROC + local rank, exactly as `r1mega plan` lists them.
#   NODE_RANK    this node's index, 0..NNODES-1 (default $SLURM_NODEID under srun, else 0); MASTER_ADDR (default 127.0.0.1) and
#                MASTER_PORT (default 29500) are node 0's address and a free port there.
#   LOG_DIR      when set, every rank's stdout and stderr also go to
#                LOG_DIR/node<NODE_RANK>/<run id>/attempt_0/<local rank>/{stdout,stderr}.log, and the
#                console shows only the local ranks in CONSOLE_RANKS (default 0).
#   CONSOLE_RANKS  comma-separated local ranks shown on the console (default: all, or 0 with LOG_DIR).
#   OMP_NUM_THREADS  default: this node's CPUs divided by NPROC (at least 1): ranks do not
#                oversubscribe the cores (torchrun's own default is 1).
#   TORCH_COMPILE_DISABLE  default 1 without CUDA (megatron's jitted router costs seconds a
#                process on CPU and gains nothing), unset with CUDA.
#   DRY_RUN=1    start nothing: print `r1mega plan` of this launch (the config resolved as the
#                command would, checked against NNODES x NPROC and the model; every rank's groups,
#                layers, experts, rollout engine) and the command each node runs. PLAN_JSON=FILE
#                also writes the whole plan as JSON.
#   PYTHON       the interpreter (launchers/python.sh). Install first with launchers/setup.sh.
# nccl on GPU and gloo on CPU are chosen inside r1mega (r1mega.parallel.state.init_distributed).
set -euo pipefail
cd "$(dirname "$0")/.."
. launchers/python.sh

if [ $# -eq 0 ]; then
  echo "torchrun.sh: no r1mega subcommand given (e.g. NPROC=2 bash launchers/torchrun.sh train --set parallel.tp=2)" >&2
  exit 2
fi
if ! "$PYTHON" -c "import r1mega" 2>/dev/null; then
  echo "torchrun.sh: $PYTHON cannot import r1mega; run: bash launchers/setup.sh" >&2
  exit 2
fi

positive_int() {  # NAME VALUE: refuse anything but a positive integer, in one line
  if ! [[ "$2" =~ ^[1-9][0-9]*$ ]]; then
    echo "torchrun.sh: $1 must be a positive integer, got '$2'" >&2
    exit 2
  fi
}

cuda_devices=$("$PYTHON" -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)")
NPROC=${NPROC:-$(( cuda_devices > 0 ? cuda_devices : 1 ))}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-${SLURM_NODEID:-0}}  # srun sets SLURM_NODEID on each node
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
positive_int NPROC "$NPROC"
positive_int NNODES "$NNODES"
positive_int MASTER_PORT "$MASTER_PORT"
if ! [[ "$NODE_RANK" =~ ^[0-9]+$ ]] || [ "$NODE_RANK" -ge "$NNODES" ]; then
  echo "torchrun.sh: NODE_RANK must be an integer in 0..$((NNODES - 1)), got '$NODE_RANK'" >&2
  exit 2
fi

cpus=$(nproc 2>/dev/null || echo 1)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( cpus / NPROC > 0 ? cpus / NPROC : 1 ))}
if [ "$cuda_devices" -eq 0 ]; then
  export TORCH_COMPILE_DISABLE=${TORCH_COMPILE_DISABLE:-1}
fi

# The torchrun command of node $1, as an array in `cmd`.
node_command() {
  local node=$1
  shift
  cmd=("$PYTHON" -m torch.distributed.run --nproc-per-node "$NPROC")
  if [ "$NNODES" -eq 1 ]; then
    cmd+=(--standalone)
  else
    cmd+=(--nnodes "$NNODES" --node-rank "$node" --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT")
  fi
  if [ -n "${LOG_DIR:-}" ]; then
    cmd+=(--log-dir "$LOG_DIR/node$node" --tee 3 --local-ranks-filter "${CONSOLE_RANKS:-0}")
  elif [ -n "${CONSOLE_RANKS:-}" ]; then
    cmd+=(--local-ranks-filter "$CONSOLE_RANKS")
  fi
  cmd+=(-m r1mega.cli "$@")
}

if [ "${DRY_RUN:-0}" != 0 ]; then
  launches=()
  for ((node = 0; node < NNODES; node++)); do
    node_command "$node" "${@}"
    line=$(printf '%q ' "${cmd[@]}")
    launches+=(--launch "${line% }")
  done
  exec "$PYTHON" -m r1mega.cli plan --nnodes "$NNODES" --nproc-per-node "$NPROC" "${launches[@]}" \
    ${PLAN_JSON:+--plan-json "$PLAN_JSON"} -- "$@"
fi

node_command "$NODE_RANK" "$@"
echo "torchrun.sh: node $NODE_RANK of $NNODES, $NPROC process(es), OMP_NUM_THREADS=$OMP_NUM_THREADS: ${cmd[*]}" >&2
exec "${cmd[@]}"
