#!/usr/bin/env bash
# redis-suite.sh — Redis's own Tcl test suite (tag 7.0.15, "external server" mode), run unit by
# unit straight against a plain redis-server and through redis-entra-proxy, and compared.
#
# Redis is the oracle: every test that passes directly must pass through the proxy, except the
# few that AUTH injection makes inherent, listed with their reasons in
# scripts/redis-suite/expected.txt. Started from ../shared/redis-suite/ (the instrument); this
# copy adds the Entra mode and runs the project's own binary by default.
#
# Usage (see README, "Redis's own test suite"):
#   REDIS_GIT=<git dir of github:redis/redis with tag 7.0.15> scripts/redis-suite.sh
#       access-key mode (default): the proxy authenticates to a TLS-only redis-server with a
#       password in a key file.
#   PROXY_MODE=entra REDIS_GIT=... scripts/redis-suite.sh
#       Entra mode: a local managed-identity endpoint (bench/token_issuer.py) hands out tokens
#       that live TOKEN_LIFETIME (15 s) seconds, each its own ACL user on the TLS redis-server,
#       deleted when the token expires -- so a connection the proxy fails to re-authenticate in
#       time is closed by Redis, as Azure closes it. The whole suite runs under continuous
#       re-authentication.
#   PROXY_MULTIPLEX=N REDIS_GIT=... scripts/redis-suite.sh   (either PROXY_MODE)
#       multiplexed mode: the proxy runs with --multiplex N --cluster off, so the suite's clients
#       start on N shared upstream connections and each is pinned to a connection of its own
#       before its first command off the allow-list (src/mux/table.rs). Also --database 9
#       (PROXY_DATABASE): every client of the suite starts with SELECT 9 (0 with SINGLEDB=1),
#       which the proxy answers only for its own --database; any other database would pin every
#       client at its first command, and the shared path would go untested. Tests that observe
#       the sharing itself are allowed by the entries of expected.txt tagged [multiplex]. The
#       figures of the multiplexer (pins by reason, shared connections...) end the report.
#   PROXY_CMD=stunnel|haproxy|'<command with placeholders>' overrides the proxy (the stand-ins
#       validate the instrument; see ../shared/redis-suite/README.md). With a command of your
#       own, PROXY_MULTIPLEX adds nothing to it but still selects the [multiplex] entries.
#
# PROXY_CMD placeholders: {LISTEN} (127.0.0.1:PORT), {LISTEN_PORT},
# {UPSTREAM_HOST}, {UPSTREAM_PORT}, {UPSTREAM} (host:port), {TLS_NAME}, {CA_FILE}, {USER},
# {PASSWORD}, {PASSWORD_FILE}, {ADMIN_LISTEN} (a free 127.0.0.1:PORT), {WORKDIR}.
#
# Settings (environment, defaults shown):
#   REDIS_GIT            required: git dir holding tag 7.0.15 of github:redis/redis
#   PROXY_MODE=access-key  or entra
#   PROXY_MULTIPLEX=     unset or 0: the 1:1 relay (no --multiplex); N > 0: --multiplex N
#                        --cluster off, and expected.txt's [multiplex] entries apply
#   PROXY_DATABASE=      multiplexed mode: the proxy's --database (default 9, the suite's own;
#                        0 with SINGLEDB=1); ignored without PROXY_MULTIPLEX
#   PROXY_BIN=target/release/redis-entra-proxy   the binary under test
#   TOKEN_LIFETIME=15    Entra mode: seconds a token lives
#   UNITS="..."          test units to run (names as in runtest --single, without "unit/");
#                        default: see DEFAULT_UNITS below
#   OUT                  where results go (default: a new temp dir; the path is printed)
#   UNIT_TIMEOUT=240     hard limit (s) for one unit on one path
#   NO_PROGRESS_TIMEOUT=60  runtest --timeout
#   RETRY=1              re-run, through the proxy, each unit with regressions once; a test that
#                        passes on the re-run is reported as flaky, not as a regression
#   SINGLEDB=0           1 passes --singledb
#   TAGS="-slow"         runtest --tags (what Redis's own CI uses against an external server)
#   EXTRA_ARGS=""        extra runtest arguments, e.g. "--only /HELLO"
#   KEEP_WORK=0          1 keeps the work dir (certs, configs, process logs)
#
# Output: progress on stderr; the report on stdout and in $OUT/summary.txt. Per test results in
# $OUT/direct.tsv and $OUT/proxied.tsv, raw runtest logs in $OUT/logs/, regressions in
# $OUT/regressions.txt. Exit status: 0 when no test regresses beyond the allow-list, 1 when
# some do, 2 on setup errors.
set -uo pipefail

# Not in the default list: auth (every test tagged external:skip), acl and acl-v2 (nearly every
# test switches users with AUTH, which an AUTH-answering proxy deliberately does not do; add
# them with UNITS to see), and the units about server lifecycle, replication, persistence,
# memory limits or cluster (they restart or reconfigure the server, or are external:skip).
DEFAULT_UNITS="type/string type/incr type/list type/list-2 type/list-3 type/set type/zset
  type/hash type/stream type/stream-cgroups keyspace expire multi pubsub pubsubshard scripting
  functions protocol info info-command introspection introspection-2 tracking other bitops
  bitfield hyperloglog geo sort scan dump latency-monitor querybuf slowlog quit"
read -r -a UNIT_LIST <<<"$(echo ${UNITS:-$DEFAULT_UNITS})"
UNIT_TIMEOUT=${UNIT_TIMEOUT:-240}
NO_PROGRESS_TIMEOUT=${NO_PROGRESS_TIMEOUT:-60}
RETRY=${RETRY:-1}
SINGLEDB=${SINGLEDB:-0}
TAGS=${TAGS--slow}
EXTRA_ARGS=${EXTRA_ARGS:-}
PROXY_MODE=${PROXY_MODE:-access-key}
TOKEN_LIFETIME=${TOKEN_LIFETIME:-15}
PROXY_MULTIPLEX=${PROXY_MULTIPLEX:-0}
[[ $PROXY_MULTIPLEX =~ ^[0-9]+$ ]] || { echo "redis-suite.sh: PROXY_MULTIPLEX must be a number" >&2; exit 2; }
PROXY_MULTIPLEX=$((10#$PROXY_MULTIPLEX))
if ((PROXY_MULTIPLEX > 0)); then
    PROXY_NAME=${PROXY_NAME:-redis-entra-proxy ($PROXY_MODE, multiplex $PROXY_MULTIPLEX)}
else
    PROXY_NAME=${PROXY_NAME:-redis-entra-proxy ($PROXY_MODE)}
fi
REDIS_TAG=7.0.15

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
TOP=$(cd "$HERE/.." && pwd)
LIB="$HERE/redis-suite/lib.py"
EXPECTED="$HERE/redis-suite/expected.txt"
ISSUER="$TOP/bench/token_issuer.py"
PROXY_BIN=${PROXY_BIN:-$TOP/target/release/redis-entra-proxy}
# the tags of expected.txt that apply (lib.py read_expected): the mode, and multiplex
export SUITE_MODE=$PROXY_MODE
export SUITE_TAGS="$PROXY_MODE$( ((PROXY_MULTIPLEX > 0)) && echo ' multiplex')"
case $PROXY_MODE in
    access-key) DEFAULT_PROXY_CMD="$PROXY_BIN --listen {LISTEN} --upstream {UPSTREAM} \
        --tls-server-name {TLS_NAME} --ca-file {CA_FILE} --auth access-key \
        --access-key-file {PASSWORD_FILE} --admin-listen {ADMIN_LISTEN} --shutdown-grace 1s" ;;
    entra) DEFAULT_PROXY_CMD="$PROXY_BIN --listen {LISTEN} --upstream {UPSTREAM} \
        --tls-server-name {TLS_NAME} --ca-file {CA_FILE} --auth entra \
        --credential managed-identity --admin-listen {ADMIN_LISTEN} --shutdown-grace 1s" ;;
    *) echo "redis-suite.sh: PROXY_MODE must be access-key or entra" >&2; exit 2 ;;
esac
if ((PROXY_MULTIPLEX > 0)); then
    # the suite SELECTs 9 on every client it opens (0 with --singledb): the proxy's database
    PROXY_DATABASE=${PROXY_DATABASE:-$( [[ ${SINGLEDB:-0} == 1 ]] && echo 0 || echo 9)}
    DEFAULT_PROXY_CMD+=" --multiplex $PROXY_MULTIPLEX --cluster off --database $PROXY_DATABASE"
fi
PROXY_CMD=${PROXY_CMD:-$DEFAULT_PROXY_CMD}
HOST=127.0.0.1
TLS_NAME=localhost
SUITE_USER=suite

log() { printf '[%4ss] %s\n' "$SECONDS" "$*" >&2; }
die() { log "error: $*"; exit 2; }

# ---------------------------------------------------------------- prerequisites
[[ -n ${REDIS_GIT:-} ]] || die "set REDIS_GIT to a git dir of github:redis/redis that has tag $REDIS_TAG"
git --git-dir="$REDIS_GIT" rev-parse -q --verify "refs/tags/$REDIS_TAG" >/dev/null 2>&1 ||
    die "set REDIS_GIT to a git dir of github:redis/redis that has tag $REDIS_TAG ($REDIS_GIT has no such tag)"
for tool in redis-server redis-cli tclsh openssl python3 timeout; do
    command -v "$tool" >/dev/null || die "$tool not found on PATH"
done
server_version=$(redis-server --version | sed -n 's/.* v=\([0-9.]*\).*/\1/p')
[[ $server_version == "$REDIS_TAG" ]] ||
    log "warning: redis-server is $server_version, the tests are from $REDIS_TAG"

case $PROXY_CMD in
    stunnel|haproxy) ((PROXY_MULTIPLEX == 0)) ||
        die "PROXY_MULTIPLEX is for the proxy, not for the $PROXY_CMD stand-in" ;;&
    stunnel) MODE=stunnel; PROXY_NAME=stunnel; command -v stunnel >/dev/null ||
        die "stand-in mode needs stunnel (apt-get install -y stunnel4)" ;;
    haproxy) MODE=haproxy; PROXY_NAME=haproxy; command -v haproxy >/dev/null ||
        die "PROXY_CMD=haproxy needs haproxy (apt-get install -y haproxy)" ;;
    *) MODE=proxy
        [[ $PROXY_CMD != "$DEFAULT_PROXY_CMD" || -x $PROXY_BIN ]] ||
            die "no proxy binary at $PROXY_BIN: run cargo build --release (or set PROXY_BIN)" ;;
esac

# ---------------------------------------------------------------- the test tree (cached)
CACHE="${TMPDIR:-/tmp}/redis-suite-$REDIS_TAG"
if [[ ! -f $CACHE/.complete ]]; then
    log "extracting tests of redis $REDIS_TAG into $CACHE"
    rm -rf "$CACHE.tmp.$$" && mkdir -p "$CACHE.tmp.$$" || die "cannot create $CACHE.tmp.$$"
    git --git-dir="$REDIS_GIT" archive "$REDIS_TAG" tests runtest | tar -x -C "$CACHE.tmp.$$" ||
        die "git archive of $REDIS_TAG failed"
    touch "$CACHE.tmp.$$/.complete"
    rm -rf "$CACHE" && mv "$CACHE.tmp.$$" "$CACHE" || die "cannot move the tree to $CACHE"
fi
for u in "${UNIT_LIST[@]}"; do
    [[ -f $CACHE/tests/unit/$u.tcl ]] || die "no such unit: $u ($CACHE/tests/unit/$u.tcl)"
done

WORK=$(mktemp -d "${TMPDIR:-/tmp}/redis-suite-work.XXXXXX")
OUT=${OUT:-$(mktemp -d "${TMPDIR:-/tmp}/redis-suite-results.XXXXXX")}
mkdir -p "$OUT/logs" || die "cannot create $OUT"
rm -f "$OUT"/direct.tsv "$OUT"/proxied.tsv "$OUT"/proxied-retry.tsv
# each path gets its own copy of the tree: runtest writes into tests/tmp
cp -r "$CACHE" "$WORK/suite-direct" && cp -r "$CACHE" "$WORK/suite-proxied" || die "copy failed"
PASSWORD=$(openssl rand -hex 16)
printf '%s' "$PASSWORD" >"$WORK/password"
CA="$WORK/ca.pem"

# ---------------------------------------------------------------- process bookkeeping
STARTED=()
declare -A PID=()
cleanup() {
    local entry name pid i
    for ((i = ${#STARTED[@]} - 1; i >= 0; i--)); do
        entry=${STARTED[i]}; name=${entry%%:*}; pid=${entry##*:}
        kill -0 "$pid" 2>/dev/null || continue
        if [[ $name == proxy ]]; then # own process group (setsid): stop it as a group
            kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null
        else
            kill -TERM "$pid" 2>/dev/null
        fi
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        if kill -0 "$pid" 2>/dev/null; then
            log "$name ($pid) ignored SIGTERM for 5s, sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null
        fi
        wait "$pid" 2>/dev/null
    done
    cp "$WORK"/*.log "$OUT/" 2>/dev/null
    if [[ ${KEEP_WORK:-0} == 1 ]]; then log "work dir kept: $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

start() { # start NAME CMD... : background, log to $WORK/NAME.log, record the PID
    local name=$1; shift
    "$@" >"$WORK/$name.log" 2>&1 &
    PID[$name]=$!
    STARTED+=("$name:$!")
}

wait_ping() { # wait_ping NAME PORT [redis-cli args...]
    local name=$1 port=$2; shift 2
    for _ in $(seq 100); do
        kill -0 "${PID[$name]}" 2>/dev/null || die "$name exited; its log: $(tail -5 "$WORK/$name.log")"
        if [[ $(redis-cli -h "$HOST" -p "$port" "$@" ping 2>/dev/null) == PONG ]]; then return 0; fi
        sleep 0.1
    done
    die "$name: no PONG on port $port after 10s; its log: $(tail -5 "$WORK/$name.log")"
}

# ---------------------------------------------------------------- certificates
make_certs() {
    openssl req -x509 -nodes -newkey rsa:2048 -keyout "$WORK/ca.key" -out "$CA" -days 2 \
        -subj "/CN=redis-suite-ca" -addext "basicConstraints=critical,CA:TRUE" \
        -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null || die "openssl (CA) failed"
    openssl req -nodes -newkey rsa:2048 -keyout "$WORK/server.key" -out "$WORK/server.csr" \
        -subj "/CN=$TLS_NAME" 2>/dev/null || die "openssl (server key) failed"
    printf '%s\n' "subjectAltName=DNS:$TLS_NAME,IP:$HOST" "basicConstraints=CA:FALSE" \
        "keyUsage=critical,digitalSignature,keyEncipherment" "extendedKeyUsage=serverAuth" \
        >"$WORK/server.ext"
    openssl x509 -req -in "$WORK/server.csr" -CA "$CA" -CAkey "$WORK/ca.key" -CAcreateserial \
        -out "$WORK/server.pem" -days 2 -extfile "$WORK/server.ext" 2>/dev/null ||
        die "openssl (server cert) failed"
}

# ---------------------------------------------------------------- servers and the proxy
read -r PORT_DIRECT PORT_TLS PORT_PROXY PORT_ADMIN < <(python3 "$LIB" freeport 4)
TLS_CLI=(--tls --cacert "$CA" --sni "$TLS_NAME")

# Both servers get the same configuration, taken from the suite's own tests/assets/default.conf
# (minus logging, persistence and ports); only the listener (plaintext vs TLS-only) and, with the
# real proxy, requirepass + an ACL user differ.
COMMON_CONF=(--bind "$HOST" --daemonize no --save '' --appendonly no --loglevel notice
    --databases 16 --notify-keyspace-events KEA --latency-monitor-threshold 1
    --repl-diskless-sync-delay 0 --enable-protected-configs yes --enable-debug-command yes
    --enable-module-command yes)

start_direct_server() {
    mkdir -p "$WORK/direct-data"
    start redis-direct redis-server "${COMMON_CONF[@]}" --port "$PORT_DIRECT" --dir "$WORK/direct-data"
    wait_ping redis-direct "$PORT_DIRECT"
}

start_tls_server() {
    local auth=()
    if [[ $MODE == proxy ]]; then
        auth=(--requirepass "$PASSWORD" --user "$SUITE_USER" on ">$PASSWORD" '~*' '&*' '+@all')
    fi
    mkdir -p "$WORK/tls-data"
    start redis-tls redis-server "${COMMON_CONF[@]}" --port 0 --tls-port "$PORT_TLS" \
        --tls-cert-file "$WORK/server.pem" --tls-key-file "$WORK/server.key" \
        --tls-ca-cert-file "$CA" --tls-auth-clients no --dir "$WORK/tls-data" "${auth[@]}"
    if [[ $MODE == proxy ]]; then
        wait_ping redis-tls "$PORT_TLS" "${TLS_CLI[@]}" --user "$SUITE_USER" --pass "$PASSWORD" --no-auth-warning
    else
        wait_ping redis-tls "$PORT_TLS" "${TLS_CLI[@]}"
    fi
}

# Entra mode: the local managed-identity endpoint, backed by the TLS server's ACL.
start_issuer() {
    [[ $MODE == proxy && $PROXY_MODE == entra ]] || return 0
    start issuer python3 "$ISSUER" --redis-port "$PORT_TLS" --redis-tls-ca "$CA" \
        --redis-tls-name "$TLS_NAME" --redis-user "$SUITE_USER" --redis-password "$PASSWORD" \
        --per-token-user --lifetime "$TOKEN_LIFETIME" --identity-header "$PASSWORD" \
        --port-file "$WORK/issuer.port" --log-file "$WORK/tokens.log"
    for _ in $(seq 100); do [[ -s $WORK/issuer.port ]] && break; sleep 0.1; done
    [[ -s $WORK/issuer.port ]] || die "token issuer did not start: $(tail -5 "$WORK/issuer.log")"
    export IDENTITY_ENDPOINT="http://127.0.0.1:$(cat "$WORK/issuer.port")/msi/token"
    export IDENTITY_HEADER=$PASSWORD
}

start_proxy() {
    case $MODE in
    stunnel)
        cat >"$WORK/stunnel.conf" <<EOF
; client mode: plaintext in, TLS out, verifying the server against the test CA
foreground = yes
pid =
debug = warning
[redis]
client = yes
accept = $HOST:$PORT_PROXY
connect = $HOST:$PORT_TLS
CAfile = $CA
verifyChain = yes
checkHost = $TLS_NAME
sni = $TLS_NAME
EOF
        start proxy setsid stunnel "$WORK/stunnel.conf" ;;
    haproxy)
        cat >"$WORK/haproxy.cfg" <<EOF
global
    maxconn 4000
defaults
    mode tcp
    timeout connect 5s
    timeout client 3600s
    timeout server 3600s
frontend plain_in
    bind $HOST:$PORT_PROXY
    default_backend redis_tls
backend redis_tls
    server redis $HOST:$PORT_TLS ssl verify required ca-file $CA verifyhost $TLS_NAME sni str($TLS_NAME)
EOF
        haproxy -c -q -f "$WORK/haproxy.cfg" || die "haproxy config rejected"
        start proxy setsid haproxy -db -f "$WORK/haproxy.cfg" ;;
    proxy)
        local cmd=$PROXY_CMD k
        local -A sub=([LISTEN]="$HOST:$PORT_PROXY" [LISTEN_PORT]="$PORT_PROXY"
            [UPSTREAM_HOST]="$HOST" [UPSTREAM_PORT]="$PORT_TLS" [UPSTREAM]="$HOST:$PORT_TLS"
            [TLS_NAME]="$TLS_NAME" [CA_FILE]="$CA" [USER]="$SUITE_USER" [PASSWORD]="$PASSWORD"
            [PASSWORD_FILE]="$WORK/password" [ADMIN_LISTEN]="$HOST:$PORT_ADMIN" [WORKDIR]="$WORK")
        for k in "${!sub[@]}"; do cmd=${cmd//"{$k}"/${sub[$k]}}; done
        echo "$cmd" >"$WORK/proxy.cmd"
        start proxy setsid bash -c "exec $cmd" ;;
    esac
    wait_ping proxy "$PORT_PROXY"
}

# ---------------------------------------------------------------- running units
# run_unit PATHNAME PORT UNIT TSV : one runtest invocation for one unit, parsed into TSV
run_unit() {
    local path=$1 port=$2 unit=$3 tsv=$4 rc=0 t0=$SECONDS
    local logf="$OUT/logs/$path.${unit//\//_}.log" args=() restored
    # undo configuration a previous unit left changed (straight on the server, not via the proxy)
    if [[ $path == direct ]]; then
        restored=$(python3 "$LIB" config restore "$WORK/config-direct.json" "$PORT_DIRECT" 2>&1)
    else
        restored=$(python3 "$LIB" config restore "$WORK/config-tls.json" "$PORT_TLS" "${TLS_AUTH_ARGS[@]}" 2>&1)
    fi
    if [[ -n $restored ]]; then echo "$path: before unit/$unit: $restored" >>"$OUT/notes.txt"; fi
    args+=(--baseport "$(python3 "$LIB" baseport)")
    if [[ $SINGLEDB == 1 ]]; then args+=(--singledb); fi
    if [[ -n $TAGS ]]; then args+=(--tags "$TAGS"); fi
    # shellcheck disable=SC2206
    if [[ -n $EXTRA_ARGS ]]; then args+=($EXTRA_ARGS); fi
    # TERM=dumb: no colours. --durable: an exception fails its test instead of ending the unit.
    # --clients 1: external mode runs one client anyway. timeout also kills the test client
    # (same process group as runtest).
    (cd "$WORK/suite-$( [[ $path == direct ]] && echo direct || echo proxied)" &&
        TERM=dumb timeout -k 10 "$UNIT_TIMEOUT" tclsh tests/test_helper.tcl --host "$HOST" \
            --port "$port" --single "unit/$unit" --durable --clients 1 \
            --timeout "$NO_PROGRESS_TIMEOUT" "${args[@]}") >"$logf" 2>&1 </dev/null || rc=$?
    python3 "$LIB" parse "unit/$unit" "$logf" "$rc" >>"$tsv" 2>"$WORK/parse.err"
    sed "s/^# /$path: /" "$WORK/parse.err" >>"$OUT/notes.txt"
    local ok err
    ok=$(grep -v '(unit completed)$' "$tsv" | grep -c "^unit/$unit	ok	")
    err=$(grep -v '(unit completed)$' "$tsv" | grep -c "^unit/$unit	err	")
    log "  $(printf '%-8s %-22s' "$path" "$unit") ok=$ok err=$err rc=$rc $((SECONDS - t0))s"
    # a server that died takes every later unit with it: fail loudly instead
    local srv=redis-direct
    if [[ $path != direct ]]; then srv=redis-tls; fi
    kill -0 "${PID[$srv]}" 2>/dev/null || die "$srv died during unit $unit; see $OUT/$srv.log"
}

# ---------------------------------------------------------------- main
{
    echo "date: $(date -u +%Y-%m-%dT%H:%MZ)"
    echo "host: $(nproc) CPUs, kernel $(uname -r)"
    echo "redis-server: $(redis-server --version)"
    echo "tests: redis $REDIS_TAG ($(git --git-dir="$REDIS_GIT" rev-parse "$REDIS_TAG^{commit}"))"
    echo "tclsh: $(echo 'puts [info patchlevel]' | tclsh)"
    echo "mode: $MODE ($PROXY_NAME)$([[ $MODE != proxy ]] && echo ', upstream without requirepass')"
    if [[ $MODE == proxy ]]; then echo "proxy command: $PROXY_CMD"; fi
    if [[ $MODE == proxy ]] && ((PROXY_MULTIPLEX > 0)); then echo "multiplex: $PROXY_MULTIPLEX shared upstream connections, database ${PROXY_DATABASE:-?}; expected.txt tags applied: $SUITE_TAGS"; fi
    if [[ $MODE == proxy && $PROXY_MODE == entra ]]; then echo "entra: tokens live ${TOKEN_LIFETIME}s, one ACL user each, deleted at expiry"; fi
    if [[ $MODE == stunnel ]]; then echo "stunnel: $(stunnel -version 2>&1 | grep -m1 '^stunnel')"; fi
    if [[ $MODE == haproxy ]]; then echo "haproxy: $(haproxy -v | head -1)"; fi
    echo "units: ${UNIT_LIST[*]}"
    echo "settings: UNIT_TIMEOUT=$UNIT_TIMEOUT NO_PROGRESS_TIMEOUT=$NO_PROGRESS_TIMEOUT RETRY=$RETRY SINGLEDB=$SINGLEDB TAGS='$TAGS' EXTRA_ARGS='$EXTRA_ARGS'"
} >"$OUT/env.txt"

log "results in $OUT (work dir $WORK)"
make_certs
start_direct_server
start_tls_server
start_issuer
start_proxy
TLS_AUTH_ARGS=("$CA" "$TLS_NAME")
if [[ $MODE == proxy ]]; then TLS_AUTH_ARGS+=("$SUITE_USER" "$WORK/password"); fi
python3 "$LIB" config snapshot "$WORK/config-direct.json" "$PORT_DIRECT" || die "config snapshot failed"
python3 "$LIB" config snapshot "$WORK/config-tls.json" "$PORT_TLS" "${TLS_AUTH_ARGS[@]}" ||
    die "config snapshot (TLS server) failed"
log "up: direct redis on $PORT_DIRECT, TLS redis on $PORT_TLS, $PROXY_NAME on $PORT_PROXY"

# units interleaved (direct, then proxied, unit by unit) so that slow drifts of the machine hit
# both paths alike
for unit in "${UNIT_LIST[@]}"; do
    run_unit direct "$PORT_DIRECT" "$unit" "$OUT/direct.tsv"
    kill -0 "${PID[proxy]}" 2>/dev/null || die "$PROXY_NAME exited; its log: $(tail -5 "$WORK/proxy.log")"
    run_unit proxied "$PORT_PROXY" "$unit" "$OUT/proxied.tsv"
    kill -0 "${PID[proxy]}" 2>/dev/null || die "$PROXY_NAME exited during unit $unit; its log: $(tail -5 "$WORK/proxy.log")"
done

if [[ $RETRY == 1 ]]; then
    mapfile -t retry_units < <(python3 "$LIB" retry-units "$OUT")
    if ((${#retry_units[@]} > 0)); then
        log "re-running through $PROXY_NAME the units with regressions: ${retry_units[*]#unit/}"
        for unit in "${retry_units[@]}"; do
            run_unit proxied-retry "$PORT_PROXY" "${unit#unit/}" "$OUT/proxied-retry.tsv"
        done
    fi
fi

echo "## environment"
sed 's/^/    /' "$OUT/env.txt"
echo
python3 "$LIB" compare "$OUT" "$EXPECTED"
rc=$?
if [[ -s $OUT/notes.txt ]]; then
    echo
    echo "notes (unit-level events, by path; the raw runtest logs are in $OUT/logs/):"
    sed 's/^/  /' "$OUT/notes.txt"
fi
if [[ $MODE == proxy && $PROXY_MODE == entra ]]; then
    echo
    echo "tokens served: $(wc -l <"$WORK/tokens.log"); re-authentications: $(python3 "$LIB" metric "$HOST:$PORT_ADMIN" 'redis_proxy_reauth_total{result="success"}'), failed: $(python3 "$LIB" metric "$HOST:$PORT_ADMIN" 'redis_proxy_reauth_total{result="failure"}')"
fi
if [[ $MODE == proxy ]] && ((PROXY_MULTIPLEX > 0)); then
    echo
    echo "multiplexer (the proxy's /metrics at the end of the run):"
    python3 "$LIB" metrics "$HOST:$PORT_ADMIN" redis_proxy_multiplex_ | grep -v '_bucket{' | sed 's/^/  /'
fi
echo
echo "wall time: ${SECONDS}s; results in $OUT"
log "done in ${SECONDS}s; results in $OUT"
exit "$rc"
