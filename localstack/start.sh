#!/usr/bin/env bash
# Start LocalStack (S3 only) and SeaweedFS in the background, on 127.0.0.1 only, and wait until
# both S3 endpoints answer a signed ListBuckets. Run install.sh first.
#
#   localstack/start.sh [localstack|seaweedfs ...]     (default: both)
#
# Each server keeps its PID file, log and a fresh data dir under the run dir:
#   $RUN/NAME.pid  $RUN/NAME.log  $RUN/NAME/
# A server that is already running (live PID from its PID file) is left alone. Exits non-zero,
# with the tail of the log, if a server does not come up in time; that server is then stopped.
#
# Environment:
#   OC_SERVERS_HOME       where install.sh put the venvs (default ~/.cache/overlaycache-servers)
#   OC_SERVERS_RUN        run dir (default /tmp/overlaycache-servers)
#   OC_LOCALSTACK_PORT    LocalStack gateway port (default 4566)
#   OC_SEAWEEDFS_S3_PORT  SeaweedFS S3 port (default 8333)
#   OC_SEAWEEDFS_MASTER_PORT, OC_SEAWEEDFS_VOLUME_PORT, OC_SEAWEEDFS_FILER_PORT,
#   OC_SEAWEEDFS_ADMIN_PORT  its other ports (defaults 9333, 9340, 8888, 23646); with another
#                         run dir and S3 port, a second instance beside the shared one
#   OC_START_TIMEOUT      seconds to wait for each server (default 90)
#   OC_KEEP_DATA          1: keep the data dir of a previous run (restart tests)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
HOME_DIR="${OC_SERVERS_HOME:-${HOME}/.cache/overlaycache-servers}"
RUN="${OC_SERVERS_RUN:-/tmp/overlaycache-servers}"
TIMEOUT="${OC_START_TIMEOUT:-90}"
LS_PORT="${OC_LOCALSTACK_PORT:-4566}"
SW_S3_PORT="${OC_SEAWEEDFS_S3_PORT:-8333}"
# SeaweedFS internals (gRPC ports are these + 10000); all bound to 127.0.0.1.
SW_MASTER_PORT="${OC_SEAWEEDFS_MASTER_PORT:-9333}"
SW_VOLUME_PORT="${OC_SEAWEEDFS_VOLUME_PORT:-9340}"
SW_FILER_PORT="${OC_SEAWEEDFS_FILER_PORT:-8888}"
SW_ADMIN_PORT="${OC_SEAWEEDFS_ADMIN_PORT:-23646}"
export OC_SERVERS_RUN="${RUN}" OC_LOCALSTACK_PORT="${LS_PORT}" OC_SEAWEEDFS_S3_PORT="${SW_S3_PORT}"
# Probes and servers talk to loopback only: never through a proxy.
export NO_PROXY="127.0.0.1,localhost${NO_PROXY:+,${NO_PROXY}}" no_proxy="127.0.0.1,localhost${no_proxy:+,${no_proxy}}"

PY="$(command -v python3)"
# Run by its path: it needs only the standard library, not an installed overlaycache.
SERVERS_PY="${HERE}/../overlaycache/testing/servers.py"
log() { printf '[start] %s\n' "$*" >&2; }

running() { # running NAME: true if NAME's PID file names a live process (a zombie is not live)
  local pidfile="${RUN}/$1.pid" pid
  [[ -f "${pidfile}" ]] || return 1
  pid="$(cat "${pidfile}")"
  kill -0 "${pid}" 2>/dev/null || return 1
  [[ "$(awk '/^State:/ {print $2}' "/proc/${pid}/status" 2>/dev/null)" != Z ]]
}

port_busy() { # port_busy PORT: true if something listens on TCP PORT (any address)
  ss -Htln "( sport = :$1 )" 2>/dev/null | grep -q .
}

# Fail if PID has a listening TCP socket on anything but loopback.
check_loopback_only() {
  local name="$1" pid="$2" bad
  bad="$(ss -Htlnp 2>/dev/null | grep -F "pid=${pid}," | awk '{print $4}' \
    | grep -v -E '^(127\.[0-9.]+|\[::1\]|\[::ffff:127\.[0-9.]+\]):[0-9]+$' || true)"
  if [[ -n "${bad}" ]]; then
    log "ERROR: ${name} (PID ${pid}) listens on a non-loopback address: ${bad//$'\n'/ }; stopping it"
    kill -KILL "${pid}" 2>/dev/null || true
    return 1
  fi
}

# launch NAME CMD...: start CMD in its own session, output to NAME.log, PID to NAME.pid.
launch() {
  local name="$1"
  shift
  setsid "$@" >"${RUN}/${name}.log" 2>&1 </dev/null &
  echo $! >"${RUN}/${name}.pid"
}

# wait_up NAME: wait for the S3 endpoint; on failure print the log tail and stop the server.
wait_up() {
  local name="$1" pid t0 t1
  pid="$(cat "${RUN}/${name}.pid")"
  t0="$(date +%s.%N)"
  if ! "${PY}" "${SERVERS_PY}" wait "${name}" "${TIMEOUT}" >/dev/null \
    || ! kill -0 "${pid}" 2>/dev/null; then
    log "ERROR: ${name} did not come up within ${TIMEOUT}s; last lines of ${RUN}/${name}.log:"
    tail -n 40 "${RUN}/${name}.log" >&2 || true
    OC_SERVERS_RUN="${RUN}" "${HERE}/stop.sh" "${name}" >&2 || true
    return 1
  fi
  t1="$(date +%s.%N)"
  check_loopback_only "${name}" "${pid}" || return 1
  log "${name} up (PID ${pid}) in $(awk -v a="${t0}" -v b="${t1}" 'BEGIN{printf "%.1f", b-a}')s"
}

start_localstack() {
  local venv="${HOME_DIR}/localstack-venv" dir="${RUN}/localstack"
  if running localstack; then
    log "localstack already running (PID $(cat "${RUN}/localstack.pid"))"
    return 0
  fi
  [[ -x "${venv}/bin/python" ]] || { log "ERROR: ${venv} missing: run ${HERE}/install.sh"; return 1; }
  port_busy "${LS_PORT}" && { log "ERROR: port ${LS_PORT} is already in use"; return 1; }
  [[ "${OC_KEEP_DATA:-0}" == 1 ]] || rm -rf "${dir}"
  mkdir -p "${dir}/fs" "${dir}/tmp"
  # The launcher guards socket.bind (the default twisted gateway ignores GATEWAY_LISTEN's host).
  # DISABLE_EVENTS turns analytics off; the API/analytics URLs point at a closed loopback port as
  # a second fence; LOCALSTACK_HOST avoids the localhost.localstack.cloud name (a DNS lookup).
  (
    cd "${dir}"
    launch localstack env \
      OVERRIDE_IN_DOCKER=0 \
      GATEWAY_LISTEN="127.0.0.1:${LS_PORT}" \
      LOCALSTACK_HOST="127.0.0.1:${LS_PORT}" \
      SERVICES=s3 \
      EAGER_SERVICE_LOADING=1 \
      PERSISTENCE=0 \
      DNS_ADDRESS=0 \
      DISABLE_EVENTS=1 \
      SKIP_SSL_CERT_DOWNLOAD=1 \
      ANALYTICS_API="http://127.0.0.1:9/" \
      API_ENDPOINT="http://127.0.0.1:9/" \
      FILESYSTEM_ROOT="${dir}/fs" \
      TMPDIR="${dir}/tmp" \
      "${venv}/bin/python" "${HERE}/localstack_launcher.py"
  )
}

start_seaweedfs() {
  local weed="${HOME_DIR}/seaweedfs-venv/bin/weed" dir="${RUN}/seaweedfs" p
  if running seaweedfs; then
    log "seaweedfs already running (PID $(cat "${RUN}/seaweedfs.pid"))"
    return 0
  fi
  [[ -x "${weed}" ]] || { log "ERROR: ${weed} missing: run ${HERE}/install.sh"; return 1; }
  for p in "${SW_S3_PORT}" "${SW_MASTER_PORT}" "${SW_VOLUME_PORT}" "${SW_FILER_PORT}" "${SW_ADMIN_PORT}" \
    $((SW_S3_PORT + 10000)) $((SW_MASTER_PORT + 10000)) $((SW_VOLUME_PORT + 10000)) \
    $((SW_FILER_PORT + 10000)) $((SW_ADMIN_PORT + 10000)); do
    port_busy "${p}" && { log "ERROR: port ${p} (SeaweedFS) is already in use"; return 1; }
  done
  [[ "${OC_KEEP_DATA:-0}" == 1 ]] || rm -rf "${dir}"
  mkdir -p "${dir}/data" "${dir}/admin" "${dir}/tmp"
  "${PY}" "${SERVERS_PY}" seaweedfs-s3-config >"${dir}/s3.json"
  # -ip/-ip.bind: without them weed binds 0.0.0.0 and advertises a guessed address;
  # -master.telemetry=false: otherwise it reports to telemetry.seaweedfs.com.
  # -s3.autoCreateBucket=false: a PUT into a missing bucket must fail as on AWS (NoSuchBucket).
  # WebDAV, Iceberg and Lance endpoints are off; the admin server cannot be turned off in mini
  # mode (only its UI), so it gets a fixed loopback port. Its gRPC unix sockets are hard-wired
  # to /tmp/seaweedfs-*-grpc-PORT.sock; weed removes them on exit, stop.sh after a KILL.
  (
    cd "${dir}"
    launch seaweedfs env -u AWS_ACCESS_KEY_ID -u AWS_SECRET_ACCESS_KEY TMPDIR="${dir}/tmp" \
      "${weed}" mini \
      -dir="${dir}/data" \
      -ip=127.0.0.1 -ip.bind=127.0.0.1 \
      -master.telemetry=false \
      -s3.config="${dir}/s3.json" \
      -s3.autoCreateBucket=false \
      -s3.port="${SW_S3_PORT}" \
      -master.port="${SW_MASTER_PORT}" \
      -volume.port="${SW_VOLUME_PORT}" \
      -filer.port="${SW_FILER_PORT}" \
      -admin.port="${SW_ADMIN_PORT}" \
      -admin.ui=false \
      -admin.dataDir="${dir}/admin" \
      -webdav=false \
      -s3.port.iceberg=0 \
      -s3.port.lance=0 \
      -filer.localSocket="${dir}/filer.sock" \
      -s3.localSocket="${dir}/s3.sock"
  )
}

mkdir -p "${RUN}"
names=("$@")
[[ ${#names[@]} -gt 0 ]] || names=(localstack seaweedfs)
for name in "${names[@]}"; do
  case "${name}" in
    localstack | seaweedfs) ;;
    *) log "ERROR: unknown server ${name} (localstack|seaweedfs)"; exit 2 ;;
  esac
done

# Launch all first so that they boot in parallel, then wait for each.
declare -A fresh=()
for name in "${names[@]}"; do
  if ! running "${name}"; then fresh[${name}]=1; fi
  "start_${name}"
done
status=0
for name in "${names[@]}"; do
  if [[ -n "${fresh[${name}]:-}" ]]; then
    wait_up "${name}" || status=1
  else
    "${PY}" "${SERVERS_PY}" wait "${name}" 10 >/dev/null || {
      log "ERROR: ${name} is running but does not answer"
      status=1
    }
  fi
done
[[ ${status} -eq 0 ]] || exit "${status}"
"${PY}" "${SERVERS_PY}" show "${names[@]}"
