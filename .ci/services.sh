# Sourced by .ci/run: installs and starts what the tests need on a bare machine.
# Fashion-MNIST (Debian's dataset-fashion-mnist) is optional for tests; they use digits.
#
# PostgreSQL: the multi-worker tests (tests/test_workers.py) need a real server. This
# installs Debian's `postgresql` when absent, starts a private cluster on 127.0.0.1 on a free
# port (data under $HWCOMPRESS_PG_DIR, default /tmp/hwcompress-pg), creates a database and
# exports HWCOMPRESS_TEST_POSTGRES=postgresql://... for the tests. Sourcing it twice reuses
# the running cluster. Works as root (the server runs as the `postgres` user) or as a user.
# It is sourced under `set -euo pipefail`, so it never calls `exit` and checks every step.

_hwc_pg_log() { echo "services.sh: $*" >&2; }

_hwc_pg_bindir() {
    # newest installed server's bin directory (Debian keeps them under /usr/lib/postgresql)
    local d
    d=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
    if [ -n "$d" ] && [ -x "$d/initdb" ]; then echo "$d"; return 0; fi
    if command -v initdb >/dev/null 2>&1; then dirname "$(command -v initdb)"; return 0; fi
    return 1
}

_hwc_pg_install() {
    if _hwc_pg_bindir >/dev/null; then return 0; fi
    if [ "$(id -u)" != 0 ]; then
        _hwc_pg_log "postgresql is not installed and this is not root: install it (apt-get install postgresql)"
        return 1
    fi
    _hwc_pg_log "installing postgresql (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # policy-rc.d 101: do not start Debian's own cluster; we run a private one
    local policy=/usr/sbin/policy-rc.d had_policy=0
    if [ -e "$policy" ]; then had_policy=1; fi
    if [ "$had_policy" = 0 ]; then printf '#!/bin/sh\nexit 101\n' >"$policy"; chmod +x "$policy"; fi
    apt-get install -y -qq --no-install-recommends postgresql >/dev/null
    if [ "$had_policy" = 0 ]; then rm -f "$policy"; fi
    _hwc_pg_bindir >/dev/null
}

# run a command as the server's owner: `postgres` when we are root (initdb refuses root)
_hwc_pg_as_owner() {
    if [ "$(id -u)" = 0 ]; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

_hwc_pg_free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

_hwc_pg_start() {
    local bindir dir data port url
    bindir=$(_hwc_pg_bindir) || return 1
    dir=${HWCOMPRESS_PG_DIR:-/tmp/hwcompress-pg}
    data="$dir/data"
    # already running from an earlier source: reuse it
    if [ -f "$dir/port" ] && [ -f "$data/postmaster.pid" ]; then
        port=$(cat "$dir/port")
        if "$bindir/pg_isready" -q -h 127.0.0.1 -p "$port"; then
            export HWCOMPRESS_TEST_POSTGRES="postgresql://postgres@127.0.0.1:$port/hwcompress_test"
            _hwc_pg_log "reusing PostgreSQL on 127.0.0.1:$port"
            return 0
        fi
    fi
    if [ "$(id -u)" = 0 ] && ! id postgres >/dev/null 2>&1; then
        useradd --system --home-dir "$dir" --shell /bin/sh postgres
    fi
    mkdir -p "$dir"
    if [ "$(id -u)" = 0 ]; then chown postgres: "$dir"; fi
    chmod 700 "$dir"
    if [ ! -f "$data/PG_VERSION" ]; then
        rm -rf "$data"
        _hwc_pg_as_owner "$bindir/initdb" -D "$data" -U postgres --auth=trust \
            --encoding=UTF8 --locale=C.UTF-8 >"$dir/initdb.log" 2>&1 \
            || _hwc_pg_as_owner "$bindir/initdb" -D "$data" -U postgres --auth=trust \
                --encoding=UTF8 --no-locale >"$dir/initdb.log" 2>&1 \
            || { _hwc_pg_log "initdb failed, see $dir/initdb.log"; return 1; }
    fi
    port=$(_hwc_pg_free_port)
    # a stale pid file from a killed server would stop pg_ctl; the server is not running here
    rm -f "$data/postmaster.pid"
    _hwc_pg_as_owner "$bindir/pg_ctl" -D "$data" -l "$dir/server.log" -w -t 60 \
        -o "-h 127.0.0.1 -p $port -k $dir -c max_connections=200 -c fsync=off" start >/dev/null \
        || { _hwc_pg_log "PostgreSQL did not start, see $dir/server.log"; return 1; }
    echo "$port" >"$dir/port"
    if ! "$bindir/psql" -h 127.0.0.1 -p "$port" -U postgres -d postgres -tAc \
            "SELECT 1 FROM pg_database WHERE datname = 'hwcompress_test'" | grep -q 1; then
        "$bindir/createdb" -h 127.0.0.1 -p "$port" -U postgres hwcompress_test
    fi
    export HWCOMPRESS_TEST_POSTGRES="postgresql://postgres@127.0.0.1:$port/hwcompress_test"
    _hwc_pg_log "PostgreSQL on 127.0.0.1:$port, HWCOMPRESS_TEST_POSTGRES=$HWCOMPRESS_TEST_POSTGRES"
}

if [ -z "${HWCOMPRESS_TEST_POSTGRES:-}" ]; then
    _hwc_pg_install
    _hwc_pg_start
fi
