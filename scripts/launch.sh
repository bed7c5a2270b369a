#!/usr/bin/env bash
# Runs one training in N processes on this host: N x `jaxrl-fp16 train CONFIG [args]`, process i with
#   distributed.enabled=true distributed.coordinator_address=localhost:PORT distributed.num_processes=N
#   distributed.process_id=i
# (PORT: a free one, or $JAXRL_PORT). Each line of output (stdout and stderr) is prefixed with "[i] ". Waits for
# all; when one fails, the others are stopped (SIGTERM) and the script exits with the failed process's status.
# Requires bash >= 5.1.
#   scripts/launch.sh 2 configs/tiny_fp32.yaml --run-dir runs/two mesh.data=2 mesh.fsdp=4
# On a CPU, give each process its devices: XLA_FLAGS=--xla_force_host_platform_device_count=4.
# $JAXRL is the command (default: jaxrl-fp16 on the PATH, else the checkout's .venv/bin/jaxrl-fp16).
set -uo pipefail
n=${1:?usage: scripts/launch.sh N CONFIG [args ...]}
config=${2:?usage: scripts/launch.sh N CONFIG [args ...]}
shift 2
case $n in '' | *[!0-9]* | 0) echo "scripts/launch.sh: N must be a positive integer, got '$n'" >&2; exit 2 ;; esac
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [[ -z ${JAXRL:-} ]]; then  # on the PATH, else the checkout's .venv (make install)
  if command -v jaxrl-fp16 >/dev/null; then JAXRL=jaxrl-fp16
  elif [[ -x $root/.venv/bin/jaxrl-fp16 ]]; then JAXRL=$root/.venv/bin/jaxrl-fp16
  else echo "scripts/launch.sh: no jaxrl-fp16 on the PATH nor in $root/.venv (make install, or set JAXRL)" >&2; exit 2
  fi
fi
if [[ -z ${PYTHON:-} ]]; then PYTHON=python3; [[ -x $root/.venv/bin/python ]] && PYTHON=$root/.venv/bin/python; fi
port=${JAXRL_PORT:-$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("localhost", 0)); print(s.getsockname()[1])')}

fifos=$(mktemp -d)  # one pipe per process, to its output filter
declare -A index_of  # pid -> process index, of the processes still running
killer=
stop_all() {  # SIGTERM (a process stuck in a collective with a dead peer ignores it), SIGKILL after a grace
  local pids=("${!index_of[@]}")
  ((${#pids[@]})) || return 0
  kill -TERM "${pids[@]}" 2>/dev/null
  (sleep "${JAXRL_KILL_AFTER:-30}"; kill -KILL "${pids[@]}" 2>/dev/null) &
  killer=$!
}
trap 'stop_all; rm -rf "$fifos"; exit 143' TERM
trap 'stop_all; rm -rf "$fifos"; exit 130' INT

filters=()
for ((i = 0; i < n; i++)); do
  mkfifo "$fifos/$i"
  sed -u "s/^/[$i] /" <"$fifos/$i" &
  filters+=($!)
  "$JAXRL" train "$config" "$@" distributed.enabled=true "distributed.coordinator_address=localhost:$port" \
    "distributed.num_processes=$n" "distributed.process_id=$i" >"$fifos/$i" 2>&1 &
  index_of[$!]=$i
done

status=0
while ((${#index_of[@]})); do
  wait -n -p done_pid "${!index_of[@]}"
  rc=$?
  i=${index_of[$done_pid]}
  unset "index_of[$done_pid]"
  if ((rc != 0 && status == 0)); then
    status=$rc
    echo "scripts/launch.sh: process $i exited with status $rc; stopping the others" >&2
    stop_all
  fi
done
if [ -n "$killer" ]; then kill "$killer" 2>/dev/null; fi
wait "${filters[@]}"  # the last lines of output
rm -rf "$fifos"
exit "$status"
