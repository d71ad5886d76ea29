#!/usr/bin/env bash
# Stop the servers that start.sh started, by the PIDs in their PID files: SIGTERM, then SIGKILL
# after a timeout. Removes each server's data dir, PID file and any SeaweedFS gRPC sockets it left;
# keeps NAME.log in the run dir for post-mortems. Idempotent: a server that is not running is
# only cleaned up.
#
#   localstack/stop.sh [localstack|seaweedfs ...]      (default: both)
#
# Environment: OC_SERVERS_RUN (default /tmp/overlaycache-servers), OC_STOP_TIMEOUT (default 20 s).
set -euo pipefail

RUN="${OC_SERVERS_RUN:-/tmp/overlaycache-servers}"
TIMEOUT="${OC_STOP_TIMEOUT:-20}"
log() { printf '[stop] %s\n' "$*" >&2; }

# is_ours PID NAME: the PID still runs the server we started (guards against a reused PID).
is_ours() {
  local cmd
  cmd="$(tr '\0' ' ' <"/proc/$1/cmdline" 2>/dev/null)" || return 1
  case "$2" in
    localstack) [[ "${cmd}" == *localstack_launcher.py* || "${cmd}" == *localstack.runtime.main* ]] ;;
    seaweedfs) [[ "${cmd}" == *weed\ mini* ]] ;;
    *) return 1 ;;
  esac
}

stop_one() {
  local name="$1" pidfile="${RUN}/$1.pid" pid waited=0 grpc_ports=""
  if [[ -f "${pidfile}" ]]; then
    pid="$(cat "${pidfile}")"
    if [[ "${pid}" =~ ^[0-9]+$ ]] && kill -0 "${pid}" 2>/dev/null && is_ours "${pid}" "${name}"; then
      if [[ "${name}" == seaweedfs ]]; then
        # Remember its gRPC unix sockets (/tmp/seaweedfs-*-grpc-PORT.sock) to clean up after a KILL.
        grpc_ports="$(ss -Hxlp 2>/dev/null | grep -F "pid=${pid}," \
          | grep -o -E '/tmp/seaweedfs-[a-z]+-grpc-[0-9]+\.sock' || true)"
      fi
      log "stopping ${name} (PID ${pid})"
      kill -TERM "${pid}" 2>/dev/null || true
      while kill -0 "${pid}" 2>/dev/null && ((waited < TIMEOUT * 10)); do
        sleep 0.1
        waited=$((waited + 1))
      done
      if kill -0 "${pid}" 2>/dev/null; then
        log "${name} (PID ${pid}) still alive after ${TIMEOUT}s: SIGKILL"
        # start.sh runs each server in its own session, so its process group id is its PID.
        kill -KILL -- "-${pid}" 2>/dev/null || kill -KILL "${pid}" 2>/dev/null || true
        while kill -0 "${pid}" 2>/dev/null; do sleep 0.1; done
      fi
      log "${name} stopped after $((waited / 10)).$((waited % 10))s"
    else
      log "${name} not running (stale or foreign PID file)"
    fi
    rm -f "${pidfile}"
  else
    log "${name} not running"
  fi
  local sock
  for sock in ${grpc_ports}; do rm -f "${sock}"; done
  rm -rf "${RUN:?}/${name}"
}

names=("$@")
[[ ${#names[@]} -gt 0 ]] || names=(localstack seaweedfs)
for name in "${names[@]}"; do
  case "${name}" in
    localstack | seaweedfs) stop_one "${name}" ;;
    *) log "unknown server ${name} (localstack|seaweedfs)"; exit 2 ;;
  esac
done
