#!/usr/bin/env bash
# Stop the single-node SLURM started by tests/cluster/start_slurm.sh [RUN_DIR]: cancel its jobs, then stop
# slurmd, slurmctld and munged by the pid files in RUN_DIR (only daemons that script started; munged is
# left alone when it was already running before). Safe to run twice; the packages stay installed.
#
#   tests/cluster/stop_slurm.sh [RUN_DIR]     (default RUN_DIR: /tmp/latent-atlas-slurm)
set -uo pipefail

RUN_DIR=${1:-/tmp/latent-atlas-slurm}
export PATH=$PATH:/usr/sbin:/sbin

say() { echo "[stop_slurm] $*"; }

[[ $(id -u) -eq 0 ]] || { echo "[stop_slurm] ERROR: must run as root" >&2; exit 2; }
[[ -d $RUN_DIR ]] || { say "no run directory $RUN_DIR: nothing to stop"; exit 0; }

alive() { [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

# Cancel what is still queued or running (a test that timed out), so that no job step outlives slurmd.
if alive "$RUN_DIR/slurmctld.pid"; then
    jobs=$(squeue -h -t PENDING,RUNNING,CONFIGURING,COMPLETING -o %i 2>/dev/null | tr '\n' ' ')
    if [[ -n ${jobs// /} ]]; then
        say "cancelling jobs: $jobs"
        # shellcheck disable=SC2086
        scancel $jobs 2>/dev/null || true
        for _ in $(seq 30); do
            [[ -z $(squeue -h -t PENDING,RUNNING,CONFIGURING,COMPLETING -o %i 2>/dev/null) ]] && break
            sleep 1
        done
    fi
fi

stop() { # stop NAME PIDFILE
    local name=$1 pidfile=$2 pid
    if ! alive "$pidfile"; then
        say "$name: not running"
        rm -f "$pidfile"
        return
    fi
    pid=$(cat "$pidfile")
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 100); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        say "$name (pid $pid) ignored SIGTERM; sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
        sleep 0.2
    fi
    say "$name (pid $pid) stopped"
    rm -f "$pidfile"
}

stop slurmd "$RUN_DIR/slurmd.pid"
stop slurmctld "$RUN_DIR/slurmctld.pid"
stop munged "$RUN_DIR/munged.pid"
exit 0
