# Sourced by .ci/run: installs headless Chromium, which the report tests use to render
# report.html to a PNG as a user sees it (tests/report/test_glance.py).
#
# Installs Debian's `chromium` (apt-get, no recommends) when no chromium is on PATH, and exports
# HWCOMPRESS_CHROMIUM with the binary's path for the tests. It is sourced under
# `set -euo pipefail`, so it never calls `exit` and checks every step. Also runs on its own:
# `bash .ci/chromium.sh` (as root, or install the package yourself: apt-get install chromium).

_hwc_chromium_log() { echo "chromium.sh: $*" >&2; }

_hwc_chromium_find() {
    local name
    for name in chromium chromium-browser google-chrome; do
        if command -v "$name" >/dev/null 2>&1; then command -v "$name"; return 0; fi
    done
    return 1
}

_hwc_chromium_install() {
    if _hwc_chromium_find >/dev/null; then return 0; fi
    if [ "$(id -u)" != 0 ]; then
        _hwc_chromium_log "chromium is not installed and this is not root: install it (apt-get install chromium)"
        return 1
    fi
    _hwc_chromium_log "installing chromium (apt-get)"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null
    _hwc_chromium_find >/dev/null
}

if [ -z "${HWCOMPRESS_CHROMIUM:-}" ]; then
    # the last check decides: a failed apt-get leaves no chromium on PATH
    if _hwc_chromium_install && HWCOMPRESS_CHROMIUM=$(_hwc_chromium_find); then
        export HWCOMPRESS_CHROMIUM
        _hwc_chromium_log "HWCOMPRESS_CHROMIUM=$HWCOMPRESS_CHROMIUM"
    else
        _hwc_chromium_log "no chromium on PATH: the report's rendering tests cannot run"
        false  # sourced under set -e: stops .ci/run here; run on its own: exit status 1
    fi
fi
