#!/usr/bin/env bash
# Screenshots of the demo's MLflow runs in headless Chromium (after `make demo`):
#   docs/mlflow-runs.png          the experiment's run list with per-task metrics
#   docs/mlflow-metric-chart.png  per-task metrics of the pipeline run, as curves over tasks
# Needs Debian's `chromium` package. Usage: docs/screenshots.sh [experiment name]
set -euo pipefail
cd "$(dirname "$0")/.."
EXPERIMENT=${1:-recall-shapes-tiny}
PORT=${PORT:-5055}
BIN=.venv/bin
export MLFLOW_DISABLE_TELEMETRY=true MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false
$BIN/mlflow server --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port "$PORT" --workers 1 \
    >/tmp/recall-mlflow-ui.log 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 120); do curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break; sleep 0.5; done

read -r EXP RUN < <($BIN/python - "$EXPERIMENT" <<'PY'
import sys
from mlflow import MlflowClient
client = MlflowClient("sqlite:///mlflow.db")
exp = client.get_experiment_by_name(sys.argv[1])
if exp is None:
    sys.exit(f"no experiment {sys.argv[1]!r} in mlflow.db: run `make demo` first")
runs = client.search_runs([exp.experiment_id], "tags.`recall.role` = 'pipeline'", order_by=["attributes.start_time DESC"], max_results=1)
print(exp.experiment_id, runs[0].info.run_id)
PY
)
shoot() {
    chromium --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size="$1" \
        --virtual-time-budget=25000 --screenshot="$2" "$3" 2>/dev/null
}
BASE="http://127.0.0.1:$PORT/#"
shoot 1700,1000 docs/mlflow-runs.png "$BASE/experiments/$EXP/runs?searchFilter=&orderByKey=attributes.start_time&orderByAsc=false"
shoot 1500,1100 docs/mlflow-metric-chart.png "$BASE/experiments/$EXP/runs/$RUN/model-metrics"
echo "wrote docs/mlflow-runs.png docs/mlflow-metric-chart.png (experiment $EXP, pipeline run $RUN)"
