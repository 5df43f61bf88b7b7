#!/bin/sh
# Writes the nginx configuration for a lorahost fleet to stdout, from lorahost.conf.in next to
# this script. The same rendering runs in the CI test (loopback replicas) and in the Kubernetes
# router pod (one DNS name per StatefulSet pod), so what is tested is what is deployed.
#
# Usage: render.sh HOST:PORT...            (one argument per replica, in a fixed order)
# Environment (all optional):
#   LISTEN        what nginx listens on (8080; e.g. 127.0.0.1:18080)
#   RUN_DIR       pid file and temp files; must exist and be writable (/tmp/lorahost-router)
#   BASE_MODEL    the base model's id, whose requests are spread instead of hashed
#                 (SmolLM2-135M-Instruct.Q4_1, the default model's)
#   RESOLVER      DNS server for replica host names, e.g. kube-dns.kube-system.svc.cluster.local.
#                 Set, replicas are re-resolved while nginx runs (a restarted pod's new address
#                 is picked up; needs nginx >= 1.27.3). Unset, replicas must be IP addresses.
#   NJS_MODULE    the njs module (/usr/lib/nginx/modules/ngx_http_js_module.so: Debian's
#                 libnginx-mod-http-js and the official nginx image both install it there)
#   JS_FILE       lorahost.js (the one next to this script)
#   ERROR_LOG     (stderr)    ACCESS_LOG (/dev/stdout)
#   FAIL_TIMEOUT  how long a failed replica is skipped before it is tried again (10s)
#   WORKER_PROCESSES  nginx worker processes (auto: one per CPU the machine has, which in a
#                 container may be far more than its CPU limit)
# Only POSIX sh and awk: it runs in the official nginx image as it is.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
[ "$#" -gt 0 ] || { echo "usage: $0 HOST:PORT..." >&2; exit 2; }
for replica in "$@"; do
    case $replica in
        *[!A-Za-z0-9.:-]* | "" | *[!0-9] | *:*:*)
            echo "$0: replica '$replica' is not HOST:PORT" >&2; exit 2 ;;
        *:*) ;;
        *) echo "$0: replica '$replica' is not HOST:PORT" >&2; exit 2 ;;
    esac
done

resolve=""
resolver_line=""
if [ -n "${RESOLVER:-}" ]; then
    resolve=" resolve"
    # valid=: how quickly a pod's new address replaces its old one after a restart.
    resolver_line="    resolver ${RESOLVER} valid=5s ipv6=off;"
fi

# max_fails=1: one refused connection takes a replica out of the ring for FAIL_TIMEOUT, so a
# dead replica costs one retried attempt, not one per request.
servers=""
for replica in "$@"; do
    servers="${servers}        server ${replica}${resolve} max_fails=1 fail_timeout=${FAIL_TIMEOUT:-10s};
"
done

LISTEN=${LISTEN:-8080} \
RUN_DIR=${RUN_DIR:-/tmp/lorahost-router} \
BASE_MODEL=${BASE_MODEL-SmolLM2-135M-Instruct.Q4_1} \
NJS_MODULE=${NJS_MODULE:-/usr/lib/nginx/modules/ngx_http_js_module.so} \
JS_FILE=${JS_FILE:-$here/lorahost.js} \
ERROR_LOG=${ERROR_LOG:-stderr} \
ACCESS_LOG=${ACCESS_LOG:-/dev/stdout} \
WORKER_PROCESSES=${WORKER_PROCESSES:-auto} \
REPLICAS="$*" SERVERS="$servers" RESOLVER_LINE="$resolver_line" \
awk '
    BEGIN {
        names = "LISTEN RUN_DIR BASE_MODEL NJS_MODULE JS_FILE ERROR_LOG ACCESS_LOG"
        n = split(names " WORKER_PROCESSES REPLICAS", keys, " ")
        for (i = 1; i <= n; i++) value[keys[i]] = ENVIRON[keys[i]]
    }
    $0 == "# @SERVERS@"  { printf "%s", ENVIRON["SERVERS"]; next }
    $0 == "# @RESOLVER@" { if (ENVIRON["RESOLVER_LINE"] != "") print ENVIRON["RESOLVER_LINE"]; next }
    {
        # Left to right, never rescanning a substituted value (it may hold "@" or "&").
        line = $0; out = ""
        while (match(line, /@[A-Z_]+@/)) {
            key = substr(line, RSTART + 1, RLENGTH - 2)
            if (!(key in value)) {
                printf "render.sh: unknown @%s@ in the template, line %d\n", key, NR > "/dev/stderr"
                exit 1
            }
            out = out substr(line, 1, RSTART - 1) value[key]
            line = substr(line, RSTART + RLENGTH)
        }
        print out line
    }
' "$here/lorahost.conf.in"
