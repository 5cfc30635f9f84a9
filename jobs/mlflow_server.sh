#!/usr/bin/env bash
# An MLflow tracking server for the jobs, on loopback unless told otherwise.
#
#   jobs/mlflow_server.sh                                   # sqlite:///mlflow-server/mlflow.db, artifacts in mlflow-server/artifacts
#   jobs/mlflow_server.sh --backend postgresql://user:pw@db:5432/mlflow --artifacts s3://bucket/mlflow
#   jobs/mlflow_server.sh --port 5001 --host 10.0.0.5       # a private address other machines can reach
#   jobs/mlflow_server.sh --host 0.0.0.0 --allowed-hosts 'mlflow:5000,mlflow.default.svc.cluster.local:5000'
#   jobs/mlflow_server.sh --workers 1                       # one person on a laptop (default: MLflow's 4)
#
# --allowed-hosts: the Host headers MLflow answers (comma-separated, host:port as clients send it,
# `*` wildcards); without it, localhost and private IPs only, and a DNS name (a Kubernetes
# Service) gets 403 "Invalid Host header" while /health still answers. Given, it replaces that
# default: add localhost:* for a port-forward.
#
# Then, for every job (and every machine that logs):  export MLFLOW_TRACKING_URI=http://127.0.0.1:5000
# and open http://127.0.0.1:5000 to compare runs. The jobs check /health before they start.
set -euo pipefail

host=127.0.0.1
port=5000
root="${MLFLOW_SERVER_ROOT:-mlflow-server}"
backend=""
artifacts=""
allowed_hosts=()
workers=4   # MLflow's own default; 1 is plenty for one person (each worker loads MLflow: ~10 s of CPU)
while [ $# -gt 0 ]; do
    case "$1" in
        --host) host="$2"; shift 2 ;;
        --port) port="$2"; shift 2 ;;
        --backend) backend="$2"; shift 2 ;;
        --artifacts) artifacts="$2"; shift 2 ;;
        --allowed-hosts) allowed_hosts=(--allowed-hosts "$2"); shift 2 ;;
        --workers) workers="$2"; shift 2 ;;
        -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
        *) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done
mkdir -p "$root"
backend="${backend:-sqlite:///$(cd "$root" && pwd)/mlflow.db}"
artifacts="${artifacts:-$(cd "$root" && pwd)/artifacts}"
echo "MLflow server: http://$host:$port  (backend $backend, artifacts $artifacts)" >&2
exec mlflow server --host "$host" --port "$port" --workers "$workers" --backend-store-uri "$backend" \
    --artifacts-destination "$artifacts" --serve-artifacts ${allowed_hosts[@]+"${allowed_hosts[@]}"}
