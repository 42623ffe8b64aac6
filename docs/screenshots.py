"""Screenshots of the demo's MLflow runs, taken in headless Chromium (after `make demo`).

    docs/mlflow-runs.png          the per-task evaluate runs side by side with their metrics
    docs/mlflow-metric-chart.png  the pipeline run's per-task metrics as curves over tasks

Needs Debian's `chromium` and `chromium-driver` packages and `pip install selenium`:
    .venv/bin/python docs/screenshots.py [--experiment recall-shapes-tiny]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script: the checkout's packages

from devtools.servers import mlflow_server  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", default="recall-shapes-tiny")
    parser.add_argument("--store", default=f"sqlite:///{ROOT / 'mlflow.db'}")
    args = parser.parse_args()

    from mlflow import MlflowClient
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    client = MlflowClient(args.store)
    experiment = client.get_experiment_by_name(args.experiment)
    if experiment is None:
        sys.exit(f"no experiment {args.experiment!r} in {args.store}: run `make demo` first")
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"], max_results=1000)
    pipeline = next(r for r in runs if r.data.tags.get("recall.role") == "pipeline")
    evaluations = sorted(
        (r for r in runs if r.data.tags.get("mlflow.parentRunId") == pipeline.info.run_id and r.data.tags.get("recall.step") == "evaluate"),
        key=lambda r: int(r.data.tags["recall.task"]),
    )

    server = contextlib.ExitStack()
    base = server.enter_context(mlflow_server(Path(tempfile.mkdtemp()), backend_store_uri=args.store))
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1600,1000"):
        options.add_argument(flag)
    driver = None
    try:
        for _ in range(240):
            try:
                urllib.request.urlopen(f"{base}/health", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)

        def shoot(url: str, out: Path, height: int, wait: float = 12.0, scroll_to: str | None = None) -> None:
            driver.set_window_size(1600, height)
            driver.get(url)
            time.sleep(wait)
            if scroll_to:
                target = driver.find_element(By.XPATH, f"//*[normalize-space(text())='{scroll_to}']")
                driver.execute_script("arguments[0].scrollIntoView({block: 'start'});", target)
            for button in driver.find_elements(By.CSS_SELECTOR, "button[aria-label='Close']"):
                try:
                    button.click()  # the assistant side panel hides the page
                except Exception:
                    pass
            time.sleep(2)
            driver.save_screenshot(str(out))
            print(f"wrote {out.relative_to(ROOT)}")

        ids = json.dumps([r.info.run_id for r in evaluations])
        query = urllib.parse.urlencode({"runs": ids, "experiments": json.dumps([experiment.experiment_id])})
        # The metrics table of the per-task runs, below the (empty) parameters section.
        shoot(f"{base}/#/compare-runs?{query}", ROOT / "docs/mlflow-runs.png", 1250, scroll_to="Run details")
        shoot(f"{base}/#/experiments/{experiment.experiment_id}/runs/{pipeline.info.run_id}/model-metrics",
              ROOT / "docs/mlflow-metric-chart.png", 1200)
    finally:
        if driver is not None:
            driver.quit()
        server.close()


if __name__ == "__main__":
    main()
