#!/usr/bin/env bash
# slime-router benchmark harness: the same wrk load against direct-to-worker, nginx
# least_conn, SGLang's router and slime-router (plain, no-op wasm, radix-tree wasm), then a
# chaos run (kill -9 / restart workers under load). See bench/README.md.
#
#   bench/run.sh                 # full run, ~7 minutes
#   bench/run.sh --quick         # short durations, ~2 minutes (proves the harness works)
#   bench/run.sh --help
#
# Everything listens on 127.0.0.1. Results: bench/out/results.md (+ raw.jsonl, logs/).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BENCH=$ROOT/bench
OUT=$BENCH/out

DURATION=10
WARMUP=2
ROUNDS=3
WRK_THREADS=1
CONCURRENCY="1 64"
WORKERS=4
CHAOS_DURATION=30
CHAOS_CONC=32
CHAOS_KILL_EVERY=3
CHAOS_RESTART_AFTER=2
CHAOS_HEALTH_INTERVAL=0.5
PORT_BASE=28100
SGLANG_POLICY=round_robin
INSTALL=1
BUILD=1
PROFILE=0
PROFILE_SECONDS=10
ONLY=""
ALL_TARGETS="direct,nginx,sglang,slime,slime-1t,slime-noop,slime-noop3,slime-pd,mock-direct,mock-slime,mock-radix,chaos"

usage() {
    cat <<EOF
Usage: bench/run.sh [options]

  -d, --duration S        seconds per measured run (default $DURATION)
  -w, --warmup S          warm-up seconds before each measured run (default $WARMUP)
  -r, --rounds N          repeat every measurement N times, interleaved; ratios are taken
                          per round, and their median and spread reported (default $ROUNDS)
  -c, --concurrency "L"   wrk connection counts (default "$CONCURRENCY")
      --wrk-threads N     wrk threads (default $WRK_THREADS: the load generator then takes one
                          of the 2 cores, the same for every target)
  -n, --workers N         workers behind each proxy (default $WORKERS)
      --chaos-duration S  length of the chaos run (default $CHAOS_DURATION)
      --sglang-policy P   SGLang router policy (default $SGLANG_POLICY; it has no least-in-flight
                          policy for regular workers: round_robin, random, power_of_two, cache_aware)
      --only LIST         comma-separated subset of: $ALL_TARGETS
      --port-base P       first port to try (default $PORT_BASE, below the ephemeral range)
      --profile           also record a perf profile of slime-router at the highest concurrency
                          (bench/out/profile.txt)
      --quick             -d 3 -w 1 -r 1 --chaos-duration 12
      --no-install        do not apt-get/pip install anything
      --no-build          do not run cargo build / middleware-examples/build.sh
  -h, --help
EOF
}

while [ $# -gt 0 ]; do
    case $1 in
        -d | --duration) DURATION=$2; shift 2 ;;
        -w | --warmup) WARMUP=$2; shift 2 ;;
        -r | --rounds) ROUNDS=$2; shift 2 ;;
        -c | --concurrency) CONCURRENCY=$2; shift 2 ;;
        --wrk-threads) WRK_THREADS=$2; shift 2 ;;
        -n | --workers) WORKERS=$2; shift 2 ;;
        --chaos-duration) CHAOS_DURATION=$2; shift 2 ;;
        --sglang-policy) SGLANG_POLICY=$2; shift 2 ;;
        --only) ONLY=$2; shift 2 ;;
        --port-base) PORT_BASE=$2; shift 2 ;;
        --profile) PROFILE=1; shift ;;
        --quick) DURATION=3; WARMUP=1; ROUNDS=1; CHAOS_DURATION=12; shift ;;
        --no-install) INSTALL=0; shift ;;
        --no-build) BUILD=0; shift ;;
        -h | --help) usage; exit 0 ;;
        *) echo "bench/run.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
    esac
done

if [ "$WORKERS" -lt 2 ]; then
    echo "bench/run.sh: --workers must be at least 2 (the chaos run keeps one alive)" >&2
    exit 2
fi

log() { printf '[bench %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }
wanted() { [ -z "$ONLY" ] || [[ ",$ONLY," == *",$1,"* ]]; }
wanted_any() { local t; for t in "$@"; do wanted "$t" && return 0; done; return 1; }

# ---------------------------------------------------------------- processes and cleanup

PIDS=()      # every process this script started (chaos restarts append)
RUNDIR=""    # scratch: nginx configs, temp paths

alive() {
    # A zombie (exited, not yet reaped) is not alive.
    local state
    state=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) || return 1
    [ -n "$state" ] && [ "$state" != Z ]
}

# children_of PID: its child processes, read from /proc (no procps needed).
children_of() {
    local stat d rest
    for d in /proc/[0-9]*; do
        { read -r stat <"$d/stat"; } 2>/dev/null || continue
        rest=${stat##*) }
        # shellcheck disable=SC2086 # split the numeric fields
        set -- "$1" $rest
        [ "$3" = "$1" ] && echo "${d#/proc/}"
    done
    return 0
}

# forget PID...: drop from PIDS (so cleanup never signals a recycled id).
forget() {
    local keep=() pid gone
    for pid in "${PIDS[@]}"; do
        for gone in "$@"; do [ "$pid" = "$gone" ] && continue 2; done
        keep+=("$pid")
    done
    PIDS=("${keep[@]}")
}

stop_pids() {
    local pid all=() _
    for pid in "$@"; do
        all+=("$pid")
        # nginx workers and similar: stop them by id too, in case the parent dies first.
        for child in $(children_of "$pid"); do all+=("$child"); done
    done
    for pid in "${all[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for _ in $(seq 50); do
        local any=0
        for pid in "${all[@]}"; do alive "$pid" && any=1; done
        [ $any = 0 ] && break
        sleep 0.1
    done
    for pid in "${all[@]}"; do if alive "$pid"; then kill -KILL "$pid" 2>/dev/null || true; fi; done
    forget "${all[@]}"
}

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if [ ${#PIDS[@]} -gt 0 ]; then
        log "stopping ${#PIDS[@]} processes"
        stop_pids "${PIDS[@]}"
        wait 2>/dev/null || true
    fi
    [ -n "$RUNDIR" ] && rm -rf "$RUNDIR"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# start_bg LOGNAME CMD... : runs CMD in the background, its output in $OUT/logs/LOGNAME.log;
# sets LAST_PID.
LAST_PID=""
start_bg() {
    local name=$1; shift
    "$@" >"$OUT/logs/$name.log" 2>&1 &
    LAST_PID=$!
    PIDS+=("$LAST_PID")
}

# ---------------------------------------------------------------- ports

NEXT_PORT=$PORT_BASE
port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
# alloc_port VAR: the next free port from PORT_BASE on.
alloc_port() {
    while port_busy "$NEXT_PORT" || { command -v ss >/dev/null && [ -n "$(ss -Htan "sport = :$NEXT_PORT" 2>/dev/null)" ]; }; do
        NEXT_PORT=$((NEXT_PORT + 1))
    done
    printf -v "$1" '%s' "$NEXT_PORT"
    NEXT_PORT=$((NEXT_PORT + 1))
}

# wait_ready PID URL [TIMEOUT]: until POST URL answers 2xx; fails early if PID exits.
# Waits for every target in TARGETS to answer (up to $2 s each); those that do go into the
# caller's `ready` array, the others are reported unavailable in group $1.
ready_targets() {
    local group=$1 timeout=$2 key logname
    for key in "${TARGETS[@]}"; do
        [ -z "${T_PID[$key]}" ] && { ready+=("$key"); continue; }
        if wait_ready "${T_PID[$key]}" "${T_URL[$key]}" "$timeout"; then
            ready+=("$key")
        else
            case $key in nginx) logname=nginx-proxy ;; sglang) logname=sglang-router ;; *) logname=$key ;; esac
            unavailable "$group" "$key" "${T_LABEL[$key]}" "did not start or answer: $(last_line "$OUT/logs/$logname.log") (bench/out/logs/$logname.log)"
        fi
    done
}

wait_ready() {
    local pid=$1 url=$2 timeout=${3:-60}
    local deadline=$((SECONDS + timeout))
    until curl -fsS -o /dev/null -m 2 -X POST -H 'Content-Type: application/json' \
        --data "$BODY_IDS" "$url" 2>/dev/null; do
        alive "$pid" || return 1
        [ $SECONDS -ge $deadline ] && return 1
        sleep 0.2
    done
}

# wait_listening PORT [TIMEOUT]
wait_listening() {
    local deadline=$((SECONDS + ${2:-20}))
    until port_busy "$1"; do
        [ $SECONDS -ge $deadline ] && return 1
        sleep 0.05
    done
}

# ---------------------------------------------------------------- install and build

SUDO=""
[ "$(id -u)" = 0 ] || SUDO=sudo
PY=python3
SGLANG_STATUS=""   # empty when usable, else why not

install_tools() {
    local missing=()
    command -v wrk >/dev/null || missing+=(wrk)
    command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || missing+=(nginx)
    command -v curl >/dev/null || missing+=(curl)
    command -v python3 >/dev/null || missing+=(python3 python3-pip python3-venv)
    if [ ${#missing[@]} -gt 0 ]; then
        [ $INSTALL = 1 ] || die "missing ${missing[*]} (and --no-install given)"
        log "installing ${missing[*]} from Debian"
        $SUDO apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
    command -v nginx >/dev/null || export PATH=$PATH:/usr/sbin
}

install_sglang() {
    if "$PY" -c 'import sglang_router.launch_router' 2>/dev/null; then return; fi
    if [ -x "$OUT/venv/bin/python" ] && "$OUT/venv/bin/python" -c 'import sglang_router.launch_router' 2>/dev/null; then
        PY=$OUT/venv/bin/python
        return
    fi
    if [ $INSTALL = 0 ]; then
        SGLANG_STATUS="sglang-router not installed (--no-install)"
        return
    fi
    log "installing sglang-router from PyPI"
    if "$PY" -m pip install --quiet sglang-router >"$OUT/logs/pip.log" 2>&1 &&
        "$PY" -c 'import sglang_router.launch_router' 2>/dev/null; then
        return
    fi
    # An externally-managed (PEP 668) Python: use a venv under bench/out instead.
    log "pip install into $PY failed; trying a venv in bench/out/venv"
    if "$PY" -m venv "$OUT/venv" >>"$OUT/logs/pip.log" 2>&1 &&
        "$OUT/venv/bin/python" -m pip install --quiet sglang-router >>"$OUT/logs/pip.log" 2>&1 &&
        "$OUT/venv/bin/python" -c 'import sglang_router.launch_router' 2>/dev/null; then
        PY=$OUT/venv/bin/python
        return
    fi
    SGLANG_STATUS="pip install sglang-router failed (see bench/out/logs/pip.log)"
}

build() {
    if [ $BUILD = 1 ]; then
        log "cargo build --release"
        (cd "$ROOT" && cargo build --release --bins) >"$OUT/logs/cargo-build.log" 2>&1 ||
            die "cargo build --release failed: see bench/out/logs/cargo-build.log"
        if wanted_any slime-noop slime-noop3 mock-radix; then
            log "middleware-examples/build.sh"
            "$ROOT/middleware-examples/build.sh" >"$OUT/logs/middleware-build.log" 2>&1 ||
                die "middleware-examples/build.sh failed: see bench/out/logs/middleware-build.log"
        fi
    fi
    [ -x "$ROUTER" ] || die "$ROUTER missing (run without --no-build)"
    [ -x "$MOCK" ] || die "$MOCK missing (run without --no-build)"
}

# ---------------------------------------------------------------- measurement

BODY_IDS='{"input_ids":[1,2,3,4,5,6,7,8],"sampling_params":{"max_new_tokens":16,"temperature":0},"stream":false}'
BODY_TEXT='{"text":"You are a helpful assistant. Name the capital of France.","sampling_params":{"max_new_tokens":16}}'
CLK_TCK=$(getconf CLK_TCK)

# cpu_ticks PID...: utime+stime of these processes (all their threads).
cpu_ticks() {
    local total=0 pid stat rest
    for pid in "$@"; do
        stat=$(cat "/proc/$pid/stat" 2>/dev/null) || continue
        rest=${stat##*) }
        # fields after "comm)": state is field 3, utime 14, stime 15
        read -r -a f <<<"$rest"
        total=$((total + f[11] + f[12]))
    done
    echo "$total"
}

# rss_kb PID...: summed VmRSS.
rss_kb() {
    local total=0 pid kb
    for pid in "$@"; do
        kb=$(awk '/^VmRSS:/ {print $2}' "/proc/$pid/status" 2>/dev/null || true)
        total=$((total + ${kb:-0}))
    done
    echo "$total"
}

# The process (and its children, e.g. nginx workers) whose CPU and memory a target costs.
tree_pids() {
    local pid
    for pid in "$@"; do
        echo "$pid"
        children_of "$pid"
    done
}

# run_wrk CONC SECONDS URL BODY [TIMEOUT]: sets WRK_RESULT to the BENCH_RESULT JSON.
# wrk runs in the background and is waited for, so a signal reaches the cleanup at once.
WRK_RESULT=""
run_wrk() {
    local conc=$1 secs=$2 url=$3 body=$4 timeout=${5:-5s} threads=$WRK_THREADS out=$OUT/logs/wrk.out pid rc=0
    [ "$threads" -gt "$conc" ] && threads=$conc
    WRK_RESULT=""
    BENCH_BODY=$body wrk -t"$threads" -c"$conc" -d"${secs}s" --timeout "$timeout" \
        -s "$BENCH/generate.lua" "$url" >"$out" 2>&1 &
    pid=$!
    PIDS+=("$pid")
    wait "$pid" || rc=$?
    forget "$pid"
    [ $rc = 0 ] || { log "wrk failed ($rc): $(cat "$out")"; return 1; }
    WRK_RESULT=$(grep '^BENCH_RESULT ' "$out" | head -n 1 | cut -d' ' -f2-) || true
    [ -n "$WRK_RESULT" ] || { log "wrk printed no result: $(cat "$out")"; return 1; }
}

declare -A T_LABEL T_URL T_BODY T_PID T_GROUP
TARGETS=()

# add_target GROUP KEY LABEL URL BODY PID: PID "" means no router process to account.
add_target() {
    TARGETS+=("$2")
    T_GROUP[$2]=$1 T_LABEL[$2]=$3 T_URL[$2]=$4 T_BODY[$2]=$5 T_PID[$2]=$6
}

# last_line FILE: its last non-empty line, whitespace squeezed, at most 160 characters.
last_line() {
    local line
    line=$(grep -v '^[[:space:]]*$' "$1" 2>/dev/null | tail -n 1 | tr -s '[:space:]' ' ') || true
    printf '%s' "${line:0:160}"
}

unavailable() { # GROUP KEY LABEL REASON
    printf '{"group":"%s","target":"%s","label":"%s","unavailable":"%s"}\n' \
        "$1" "$2" "$3" "${4//\"/\'}" >>"$OUT/raw.jsonl"
    log "${3}: unavailable: $4"
}

measure() { # KEY CONC ROUND
    local key=$1 conc=$2 round=$3 pids=() before after result rss cpu
    [ -n "${T_PID[$key]}" ] && mapfile -t pids < <(tree_pids "${T_PID[$key]}")
    run_wrk "$conc" "$WARMUP" "${T_URL[$key]}" "${T_BODY[$key]}" || true
    before=$(cpu_ticks "${pids[@]}")
    run_wrk "$conc" "$DURATION" "${T_URL[$key]}" "${T_BODY[$key]}" || return 0
    after=$(cpu_ticks "${pids[@]}")
    result=$WRK_RESULT
    if [ ${#pids[@]} -gt 0 ]; then
        rss=$(rss_kb "${pids[@]}")
        cpu=$((after - before))
    else
        rss=null
        cpu=null
    fi
    local load1
    read -r load1 _ </proc/loadavg
    printf '%s,"group":"%s","target":"%s","label":"%s","conc":%d,"round":%d,"cpu_ticks":%s,"clk_tck":%d,"rss_kb":%s,"load1":%s}\n' \
        "${result%\}}" "${T_GROUP[$key]}" "$key" "${T_LABEL[$key]}" "$conc" "$round" "$cpu" \
        "$CLK_TCK" "$rss" "$load1" >>"$OUT/raw.jsonl"
    "$PY_REPORT" - "$result" <<'EOF' >&2
import json, sys
r = json.loads(sys.argv[1])
rps = r["requests"] / (r["duration_us"] / 1e6)
errs = r["non2xx"] + r["connect_errors"] + r["read_errors"] + r["write_errors"] + r["timeouts"]
print(f"    {rps:>10,.0f} req/s   p50 {r['p50_us']/1000:7.3f} ms   p99 {r['p99_us']/1000:7.3f} ms   errors {errs}")
EOF
}

# idle_rss KEY...: each router's RSS before any load (the radix cache loaded, nothing cached),
# appended to $OUT/idle.jsonl.
idle_rss() {
    local key
    for key in "$@"; do
        [ -n "${T_PID[$key]}" ] || continue
        printf '{"target":"%s","idle_rss_kb":%s}\n' "$key" "$(rss_kb "${T_PID[$key]}")" >>"$OUT/idle.jsonl"
    done
}

run_group() { # KEY...: every target at every concurrency, interleaved across rounds
    local round conc key
    for round in $(seq "$ROUNDS"); do
        for conc in $CONCURRENCY; do
            for key in "$@"; do
                log "round $round/$ROUNDS  c=$conc  ${T_LABEL[$key]}"
                measure "$key" "$conc" "$round"
            done
        done
    done
}

# ---------------------------------------------------------------- the targets

# start_router NAME PORT [ARGS...]: slime-router on PORT; sets LAST_PID.
start_router() {
    local name=$1 port=$2; shift 2
    start_bg "$name" "$ROUTER" --sglang-router-ip 127.0.0.1 --sglang-router-port "$port" \
        --log-level warn --shutdown-timeout 2 "$@"
}

nginx_common() { # the top of an nginx.conf, with temp paths in $RUNDIR/$1
    local dir=$RUNDIR/$1
    mkdir -p "$dir"
    cat <<EOF
daemon off;
pid $dir/nginx.pid;
error_log $OUT/logs/$1.error.log warn;
events { worker_connections 8192; }
EOF
}

nginx_http_common() {
    local dir=$RUNDIR/$1
    cat <<EOF
    access_log off;
    client_body_temp_path $dir/client_body;
    proxy_temp_path $dir/proxy;
    fastcgi_temp_path $dir/fastcgi;
    uwsgi_temp_path $dir/uwsgi;
    scgi_temp_path $dir/scgi;
    keepalive_requests 10000000;
    keepalive_timeout 300s;
EOF
}

# A fixed SGLang-shaped /generate answer (single quotes are nginx's string delimiters).
GENERATE_JSON='{"text":" the quick brown fox jumps over","output_ids":[279,3974,13876,38835,34208,927],"meta_info":{"id":"bench","finish_reason":{"type":"length","length":6},"prompt_tokens":8,"completion_tokens":6,"cached_tokens":0,"weight_version":"default","e2e_latency":0.0001}}'

start_static_workers() { # sets STATIC_URLS, STATIC_PID
    local conf=$RUNDIR/workers.conf port servers=""
    STATIC_URLS=()
    for _ in $(seq "$WORKERS"); do
        alloc_port port
        STATIC_URLS+=("http://127.0.0.1:$port")
        servers+="
    server {
        listen 127.0.0.1:$port backlog=4096;
        location = /generate { default_type application/json; return 200 '$GENERATE_JSON'; }
        location = /health { default_type application/json; return 200 '{}'; }
        location = /get_model_info { default_type application/json; return 200 '{\"model_path\":\"bench\",\"tokenizer_path\":null,\"is_generation\":true}'; }
        location = /get_server_info { default_type application/json; return 200 '{}'; }
        location / { default_type application/json; return 200 '{}'; }
    }"
    done
    {
        echo "worker_processes 2;"
        nginx_common workers
        echo "http {"
        nginx_http_common workers
        echo "$servers"
        echo "}"
    } >"$conf"
    start_bg nginx-workers nginx -p "$RUNDIR/workers" -e "$OUT/logs/workers.error.log" -c "$conf"
    STATIC_PID=$LAST_PID
    wait_ready "$STATIC_PID" "${STATIC_URLS[0]}/generate" 20 || die "nginx workers did not start (bench/out/logs/nginx-workers.log)"
}

start_nginx_proxy() { # PORT; sets LAST_PID
    local port=$1 conf=$RUNDIR/proxy.conf upstreams="" url
    for url in "${STATIC_URLS[@]}"; do upstreams+="        server ${url#http://};
"; done
    {
        echo "worker_processes auto;"
        nginx_common proxy
        cat <<EOF
http {
$(nginx_http_common proxy)
    upstream workers {
        least_conn;
$upstreams        keepalive 256;
        keepalive_requests 10000000;
        keepalive_timeout 300s;
    }
    server {
        listen 127.0.0.1:$port backlog=4096;
        location / {
            proxy_pass http://workers;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }
    }
}
EOF
    } >"$conf"
    start_bg nginx-proxy nginx -p "$RUNDIR/proxy" -e "$OUT/logs/proxy.error.log" -c "$conf"
}

# register_pairs PID ROUTER_URL: the static workers as slime registers PD engines: the first
# half prefill (bootstrap port 8998), the rest decode. Each request then goes to two workers.
register_pairs() {
    local pid=$1 base=$2 i kind deadline=$((SECONDS + 30))
    until curl -fsS -o /dev/null "$base/workers" 2>/dev/null; do
        alive "$pid" && [ $SECONDS -lt $deadline ] || return 0
        sleep 0.1
    done
    for i in "${!STATIC_URLS[@]}"; do
        if [ "$i" -lt $((${#STATIC_URLS[@]} / 2)) ]; then
            kind='"worker_type":"prefill","bootstrap_port":8998'
        else
            kind='"worker_type":"decode"'
        fi
        curl -fsS -o /dev/null "$base/workers" -d "{\"url\":\"${STATIC_URLS[$i]}\",$kind}" ||
            log "could not register ${STATIC_URLS[$i]} with $base"
    done
}

start_sglang() { # PORT; sets LAST_PID
    local port=$1 prom
    alloc_port prom
    start_bg sglang-router "$PY" -m sglang_router.launch_router --host 127.0.0.1 --port "$port" \
        --worker-urls "${STATIC_URLS[@]}" --policy "$SGLANG_POLICY" --log-level warn \
        --prometheus-host 127.0.0.1 --prometheus-port "$prom"
}

start_mock_workers() { # NAME TOKENIZER|"" : sets MOCK_URLS MOCK_PIDS MOCK_PORTS
    local name=$1 tokenizer=$2 port i
    MOCK_URLS=() MOCK_PIDS=() MOCK_PORTS=()
    for i in $(seq "$WORKERS"); do
        alloc_port port
        start_mock "$name-$i" "$port" "$tokenizer"
        MOCK_URLS+=("http://127.0.0.1:$port")
        MOCK_PIDS+=("$LAST_PID")
        MOCK_PORTS+=("$port")
    done
    for i in "${!MOCK_URLS[@]}"; do
        wait_ready "${MOCK_PIDS[$i]}" "${MOCK_URLS[$i]}/health" 60 ||
            die "mock worker ${MOCK_URLS[$i]} did not start (bench/out/logs/$name-$((i + 1)).log)"
    done
}

start_mock() { # LOGNAME PORT TOKENIZER|""
    local args=(--host 127.0.0.1 --port "$2")
    [ -n "$3" ] && args+=(--tokenizer "$3")
    start_bg "$1" "$MOCK" "${args[@]}"
}

# ---------------------------------------------------------------- chaos

chaos_run() {
    local port i k wrk_out=$OUT/logs/chaos-wrk.out killer_log=$OUT/logs/chaos-schedule.log
    log "chaos: $WORKERS mock workers, slime-router with health interval ${CHAOS_HEALTH_INTERVAL}s, wrk -c$CHAOS_CONC for ${CHAOS_DURATION}s"
    start_mock_workers chaos-worker ""
    alloc_port port
    start_router slime-chaos "$port" --worker-urls "${MOCK_URLS[@]}" \
        --rollout-health-check-interval "$CHAOS_HEALTH_INTERVAL"
    local router_pid=$LAST_PID url=http://127.0.0.1:$port
    wait_ready "$router_pid" "$url/generate" 30 || die "chaos router did not start (bench/out/logs/slime-chaos.log)"

    BENCH_BODY=$BODY_IDS wrk -t2 -c"$CHAOS_CONC" -d"${CHAOS_DURATION}s" --timeout 10s \
        -s "$BENCH/generate.lua" "$url/generate" >"$wrk_out" 2>&1 &
    local wrk_pid=$!
    PIDS+=("$wrk_pid")

    local start=$SECONDS kills=0 restarts=0 victim
    : >"$killer_log"
    sleep 1
    i=0
    # Leave the last few seconds with every worker up.
    while [ $((SECONDS - start + CHAOS_KILL_EVERY + 2)) -le "$CHAOS_DURATION" ]; do
        victim=$((i % WORKERS))
        disown "${MOCK_PIDS[$victim]}" 2>/dev/null || true   # no "Killed" job notice
        kill -KILL "${MOCK_PIDS[$victim]}" 2>/dev/null || true
        forget "${MOCK_PIDS[$victim]}"
        kills=$((kills + 1))
        echo "t=$((SECONDS - start))s kill -9 ${MOCK_URLS[$victim]} (pid ${MOCK_PIDS[$victim]})" >>"$killer_log"
        sleep "$CHAOS_RESTART_AFTER"
        for k in 1 2 3 4 5; do
            start_mock "chaos-worker-$((victim + 1))-r$kills" "${MOCK_PORTS[$victim]}" ""
            MOCK_PIDS[victim]=$LAST_PID
            if wait_listening "${MOCK_PORTS[$victim]}" 5 && alive "$LAST_PID"; then
                restarts=$((restarts + 1))
                echo "t=$((SECONDS - start))s restarted ${MOCK_URLS[$victim]} (pid $LAST_PID)" >>"$killer_log"
                break
            fi
            echo "t=$((SECONDS - start))s restart attempt $k of ${MOCK_URLS[$victim]} failed" >>"$killer_log"
            sleep 0.5
        done
        sleep $((CHAOS_KILL_EVERY - CHAOS_RESTART_AFTER))
        i=$((i + 1))
    done
    wait "$wrk_pid" || true
    forget "$wrk_pid"
    sleep 1   # let guards drop and probes settle

    local workers_json metrics result
    workers_json=$(curl -fsS -m 5 "$url/workers" || echo '{}')
    metrics=$(curl -fsS -m 5 "$url/metrics" || true)
    result=$(grep '^BENCH_RESULT ' "$wrk_out" | head -1 | cut -d' ' -f2- || true)
    [ -n "$result" ] || { log "chaos: wrk printed no result: $(cat "$wrk_out")"; result=null; }
    RESULT=$result WORKERS_JSON=$workers_json METRICS=$metrics KILLS=$kills RESTARTS=$restarts \
        N=$WORKERS CONC=$CHAOS_CONC DURATION=$CHAOS_DURATION KILL_EVERY=$CHAOS_KILL_EVERY \
        RESTART_AFTER=$CHAOS_RESTART_AFTER HEALTH_INTERVAL=$CHAOS_HEALTH_INTERVAL \
        "$PY_REPORT" - >"$OUT/chaos.json" <<'EOF'
import json, os, re
e = os.environ
wrk = json.loads(e["RESULT"])
workers = json.loads(e["WORKERS_JSON"]).get("workers", [])
failures = sum(int(float(m)) for m in re.findall(
    r"^slime_router_request_failures_total\{[^}]*\} (\S+)$", e["METRICS"], re.M))
print(json.dumps({
    "wrk": wrk,
    "in_flight": {w["url"]: w["active_requests"] for w in workers},
    "healthy": {w["url"]: w["is_healthy"] for w in workers},
    "router_failures": failures,
    "kills": int(e["KILLS"]), "restarts": int(e["RESTARTS"]),
    "workers": int(e["N"]), "conc": int(e["CONC"]), "duration": int(e["DURATION"]),
    "kill_every": int(e["KILL_EVERY"]), "restart_after": int(e["RESTART_AFTER"]),
    "health_interval": float(e["HEALTH_INTERVAL"]),
}, indent=1))
EOF
    stop_pids "$router_pid" "${MOCK_PIDS[@]}"
}

# ---------------------------------------------------------------- profile

# profile_targets KEY...: under the highest concurrency, perf stat (software counters: CPU,
# context switches, migrations per request) for each target, then a perf record of the last
# one (self time by symbol). Output: bench/out/profile.txt.
profile_targets() {
    local conc key pids wrk_pid wrk_out result csv
    conc=$(tr ' ' '\n' <<<"$CONCURRENCY" | sort -n | tail -1)
    command -v perf >/dev/null || { log "profile: perf not installed (apt-get install linux-perf)"; return 0; }
    : >"$OUT/profile.txt"
    {
        echo "# perf stat at c=$conc over ${PROFILE_SECONDS}s (per request: CPU us, context switches)"
        echo
        echo "| target | req/s | CPU us/req | ctx switches/req | migrations/req |"
        echo "|---|---|---|---|---|"
    } >>"$OUT/profile.txt"
    for key in "$@"; do
        pids=$(tree_pids "${T_PID[$key]}" | paste -sd, -)
        wrk_out=$OUT/logs/profile-$key-wrk.out
        BENCH_BODY=${T_BODY[$key]} wrk -t2 -c"$conc" -d"$((PROFILE_SECONDS + 2))s" \
            -s "$BENCH/generate.lua" "${T_URL[$key]}" >"$wrk_out" 2>&1 &
        wrk_pid=$!
        PIDS+=("$wrk_pid")
        sleep 1
        csv=$OUT/logs/profile-$key-stat.csv
        perf stat -x, -e task-clock,context-switches,cpu-migrations -p "$pids" -o "$csv" \
            -- sleep "$PROFILE_SECONDS" >/dev/null 2>&1 || log "profile: perf stat failed for $key"
        wait "$wrk_pid" || true
        forget "$wrk_pid"
        result=$(grep '^BENCH_RESULT ' "$wrk_out" | cut -d' ' -f2- || true)
        if [ -z "$result" ] || [ ! -s "$csv" ]; then continue; fi
        LABEL=${T_LABEL[$key]} RESULT=$result CSV=$csv SECS=$PROFILE_SECONDS "$PY_REPORT" - >>"$OUT/profile.txt" <<'EOF'
import json, os
e = os.environ
r = json.loads(e["RESULT"])
rps = r["requests"] / (r["duration_us"] / 1e6)
n = rps * float(e["SECS"])
v = {}
for line in open(e["CSV"]):
    f = line.strip().split(",")
    if len(f) > 2 and f[0] and f[0][0].isdigit():
        v[f[2].split(":")[0]] = float(f[0])
cpu_ms = v.get("task-clock", 0.0)
print(f"| {e['LABEL']} | {rps:,.0f} | {cpu_ms * 1000 / n:.1f} | "
      f"{v.get('context-switches', 0) / n:.2f} | {v.get('cpu-migrations', 0) / n:.3f} |")
EOF
    done
    key=${*: -1}
    log "profile: perf record of ${T_LABEL[$key]} at c=$conc for ${PROFILE_SECONDS}s"
    BENCH_BODY=${T_BODY[$key]} wrk -t2 -c"$conc" -d"$((PROFILE_SECONDS + 2))s" \
        -s "$BENCH/generate.lua" "${T_URL[$key]}" >/dev/null 2>&1 &
    wrk_pid=$!
    PIDS+=("$wrk_pid")
    sleep 1
    if perf record -F 1999 -p "${T_PID[$key]}" -o "$OUT/perf.data" -- sleep "$PROFILE_SECONDS" >"$OUT/logs/perf-record.log" 2>&1; then
        perf report -i "$OUT/perf.data" --sort symbol --stdio >"$OUT/logs/perf-symbol.txt" 2>/dev/null || true
        perf report -i "$OUT/perf.data" --sort dso --stdio >"$OUT/logs/perf-dso.txt" 2>/dev/null || true
        {
            echo
            echo "# perf record of ${T_LABEL[$key]} at c=$conc: self time by symbol ([k] = kernel)"
            grep -E '^ +[0-9]' "$OUT/logs/perf-symbol.txt" | sed -n 1,50p |
                sed -E 's/([[:space:]]+-)*[[:space:]]*$//' || true
            echo
            echo "# by shared object"
            grep -E '^ +[0-9]' "$OUT/logs/perf-dso.txt" | sed -n 1,15p |
                sed -E 's/([[:space:]]+-)*[[:space:]]*$//' || true
        } >>"$OUT/profile.txt"
    else
        log "profile: perf record failed (bench/out/logs/perf-record.log)"
    fi
    wait "$wrk_pid" || true
    forget "$wrk_pid"
    log "profile: bench/out/profile.txt"
}

# ---------------------------------------------------------------- main

main() {
    rm -rf "$OUT/logs"
    rm -f "$OUT/raw.jsonl" "$OUT/idle.jsonl" "$OUT/chaos.json" "$OUT/results.md" "$OUT/meta.json" \
        "$OUT/profile.txt" "$OUT"/perf.data*
    mkdir -p "$OUT/logs"
    : >"$OUT/raw.jsonl"
    RUNDIR=$(mktemp -d /tmp/slime-bench.XXXXXX)
    chmod 755 "$RUNDIR"   # nginx workers run as nobody when started by root
    ROUTER=$ROOT/target/release/slime-router
    MOCK=$ROOT/target/release/mock-worker
    local wasm_dir=$ROOT/middleware-examples/target/wasm32-wasip2/release
    local tokenizer=$ROOT/tests/fixtures/tokenizer.json
    read -r eph_lo _ </proc/sys/net/ipv4/ip_local_port_range || eph_lo=32768
    [ "$PORT_BASE" -ge "$eph_lo" ] && log "warning: --port-base $PORT_BASE is in the ephemeral range (from $eph_lo)"

    install_tools
    PY_REPORT=python3
    wanted sglang && install_sglang
    build

    local started=$SECONDS port key
    # Static group: nginx workers, then every proxy in front of them.
    if wanted_any direct nginx sglang slime slime-noop slime-noop3 slime-pd; then
        start_static_workers
        wanted direct && add_target static direct "direct to one worker" "${STATIC_URLS[0]}/generate" "$BODY_IDS" ""
        if wanted nginx; then
            alloc_port port
            start_nginx_proxy "$port"
            add_target static nginx "nginx least_conn" "http://127.0.0.1:$port/generate" "$BODY_IDS" "$LAST_PID"
        fi
        if wanted sglang; then
            if [ -z "$SGLANG_STATUS" ]; then
                alloc_port port
                start_sglang "$port"
                add_target static sglang "SGLang router ($SGLANG_POLICY)" "http://127.0.0.1:$port/generate" "$BODY_IDS" "$LAST_PID"
            else
                unavailable static sglang "SGLang router" "$SGLANG_STATUS"
            fi
        fi
        if wanted slime; then
            alloc_port port
            start_router slime "$port" --worker-urls "${STATIC_URLS[@]}"
            add_target static slime "slime-router" "http://127.0.0.1:$port/generate" "$BODY_IDS" "$LAST_PID"
        fi
        if wanted slime-1t; then
            alloc_port port
            start_router slime-1t "$port" --threads 1 --worker-urls "${STATIC_URLS[@]}"
            add_target static slime-1t "slime-router --threads 1" "http://127.0.0.1:$port/generate" "$BODY_IDS" "$LAST_PID"
        fi
        if wanted slime-noop; then
            alloc_port port
            start_router slime-noop "$port" --worker-urls "${STATIC_URLS[@]}" \
                --slime-router-middleware-paths "$wasm_dir/noop.wasm"
            add_target static slime-noop "slime-router + noop.wasm" "http://127.0.0.1:$port/generate" "$BODY_IDS" "$LAST_PID"
        fi
        if wanted slime-noop3; then
            alloc_port port
            start_router slime-noop3 "$port" --worker-urls "${STATIC_URLS[@]}" \
                --slime-router-middleware-paths "$wasm_dir/noop.wasm" "$wasm_dir/noop.wasm" "$wasm_dir/noop.wasm"
            add_target static slime-noop3 "slime-router + 3x noop.wasm" "http://127.0.0.1:$port/generate" "$BODY_IDS" "$LAST_PID"
        fi
        if wanted slime-pd; then
            alloc_port port
            start_router slime-pd "$port"
            add_target static slime-pd "slime-router, prefill/decode pairs" "http://127.0.0.1:$port/generate" "$BODY_IDS" "$LAST_PID"
            register_pairs "$LAST_PID" "http://127.0.0.1:$port"
        fi
        local ready=()
        ready_targets static 90
        run_group "${ready[@]}"
        if [ $PROFILE = 1 ]; then
            local prof=()
            for key in nginx slime; do [[ " ${ready[*]} " == *" $key "* ]] && prof+=("$key"); done
            [ ${#prof[@]} -gt 0 ] && profile_targets "${prof[@]}"
        fi
        # Free the cores for the next group.
        local key_pids=()
        for key in "${ready[@]}"; do [ -n "${T_PID[$key]}" ] && key_pids+=("${T_PID[$key]}"); done
        stop_pids "${key_pids[@]}" "$STATIC_PID"
    fi

    # Mock group: text requests against mock workers that tokenize for real.
    if wanted_any mock-direct mock-slime mock-radix; then
        log "starting $WORKERS mock workers with tests/fixtures/tokenizer.json"
        start_mock_workers mock-worker "$tokenizer"
        TARGETS=()
        wanted mock-direct && add_target mock mock-direct "mock-worker direct" "${MOCK_URLS[0]}/generate" "$BODY_TEXT" ""
        if wanted mock-slime; then
            alloc_port port
            start_router mock-slime "$port" --worker-urls "${MOCK_URLS[@]}"
            add_target mock mock-slime "slime-router (text)" "http://127.0.0.1:$port/generate" "$BODY_TEXT" "$LAST_PID"
        fi
        if wanted mock-radix; then
            alloc_port port
            start_router mock-radix "$port" --worker-urls "${MOCK_URLS[@]}" \
                --hf-checkpoint "$tokenizer" \
                --slime-router-middleware-paths "$wasm_dir/radix_tree.wasm"
            add_target mock mock-radix "slime-router + radix_tree.wasm" "http://127.0.0.1:$port/generate" "$BODY_TEXT" "$LAST_PID"
        fi
        local ready=()
        ready_targets mock 60
        idle_rss "${ready[@]}"
        run_group "${ready[@]}"
        local key_pids=()
        for key in "${ready[@]}"; do [ -n "${T_PID[$key]}" ] && key_pids+=("${T_PID[$key]}"); done
        stop_pids "${key_pids[@]}" "${MOCK_PIDS[@]}"
    fi

    wanted chaos && chaos_run

    write_meta
    log "done in $((SECONDS - started)) s; report: bench/out/results.md"
    echo
    "$PY_REPORT" "$BENCH/report.py" "$OUT"
}

write_meta() {
    local sglang_version nginx_version
    sglang_version=$("$PY" -c 'from importlib.metadata import version; print(version("sglang-router"))' 2>/dev/null || echo "not installed")
    nginx_version=$(nginx -v 2>&1 | sed 's/.*nginx\///')
    "$PY_REPORT" - >"$OUT/meta.json" <<EOF
import json, platform, subprocess
def sh(cmd):
    try:
        return subprocess.run(cmd, shell=True, capture_output=True, text=True, cwd="$ROOT").stdout.strip()
    except Exception:
        return ""
mem_kb = int(open("/proc/meminfo").read().split()[1])
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "unknown cpu")
git = sh("git rev-parse --short HEAD") or "unknown"
if sh("git status --porcelain --untracked-files=no"):
    git += " (with uncommitted changes)"
print(json.dumps({
    "date": sh("date -u '+%Y-%m-%d %H:%M UTC'"),
    "nproc": sh("nproc"), "mem": f"{mem_kb / 1048576:.1f} GiB", "cpu": cpu,
    "kernel": "Linux " + platform.release(),
    "git": git, "wrk": sh("wrk -v 2>&1 | head -1 | cut -d' ' -f2"),
    "nginx": "$nginx_version", "sglang": "$sglang_version",
    "duration": $DURATION, "warmup": $WARMUP, "rounds": $ROUNDS,
    "concurrency": "$CONCURRENCY".split(), "workers": $WORKERS,
    "proxy_procs": "nginx least_conn: worker_processes auto ($(nproc)); slime-router: default flags ($(nproc) serving threads)",
    "wrk_threads": $WRK_THREADS,
}))
EOF
}

main
