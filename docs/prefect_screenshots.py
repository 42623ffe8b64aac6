"""Screenshots of a recall-benchmark flow run in the Prefect UI, taken in headless Chromium.

    docs/prefect-flow-run.png   the flow run: its graph and its task runs, one per DVC stage
    docs/prefect-artifacts.png  an artifact of task 01's evaluation (default: the gate's decision)

Needs a Prefect home whose database holds a completed recall-benchmark run: the one
`python -m benchmarks.prefect_overhead --keep DIR` leaves in DIR/prefect. A Prefect server
with its UI is started on that home (loopback, a free port) and stopped afterwards. Needs
Debian's `chromium` and `chromium-driver` packages and `pip install selenium`:

    .venv/bin/python docs/prefect_screenshots.py --home DIR/prefect [--routing inline] [--artifact task-01-gate]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script: the checkout's pipeline package

from devtools.servers import prefect_env, start_prefect_server, stop
from pipeline.compat import disable_telemetry  # noqa: E402

disable_telemetry()


def find_run(routing: str):
    """The latest completed recall-benchmark flow run with ``routing``."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowFilter,
        FlowFilterName,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=["recall-benchmark"])),
            flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.COMPLETED]))),
            sort=FlowRunSort.START_TIME_DESC,
        )
    for run in runs:
        if run.parameters.get("routing", "auto") == routing:
            return run
    return None


def find_artifact(flow_run_id, key: str):
    """The artifact ``key`` of the flow run or of one of its recall-step flow runs (a task
    sent to a step deployment publishes its artifacts there)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        ArtifactFilterKey,
        FlowRunFilter,
        FlowRunFilterParentFlowRunId,
    )

    with get_client(sync_client=True) as client:
        children = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run_id])))
        found = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id, *(child.id for child in children)]),
            key=ArtifactFilterKey(any_=[key])))
    return found[0] if found else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--home", required=True, help="the Prefect home (PREFECT_HOME) holding the flow run")
    parser.add_argument("--routing", default="inline", help="of the flow run to show (inline: every stage a task run)")
    parser.add_argument("--artifact", default="task-01-gate", help="key of the artifact to show")
    parser.add_argument("--out", default=str(ROOT / "docs"))
    args = parser.parse_args()
    home, out = Path(args.home).resolve(), Path(args.out)
    if not (home / "prefect.db").exists():
        sys.exit(f"{home}: no prefect.db; run `python -m benchmarks.prefect_overhead --keep DIR` first")

    server, api_url = start_prefect_server(home, ui=True)
    driver = None
    try:
        # This process is a client of that server; its settings stay in ``home``.
        os.environ.update(prefect_env(home, api_url, ui=True))
        run = find_run(args.routing)
        if run is None:
            sys.exit(f"{home}: no completed recall-benchmark flow run with routing={args.routing}")
        artifact = find_artifact(run.id, args.artifact)
        if artifact is None:
            sys.exit(f"flow run {run.name}: no artifact {args.artifact!r}")
        ui = api_url.removesuffix("/api")
        driver = chromium()
        # The graph, and under it the tab listing the task runs (the page opens on the logs).
        shoot(driver, f"{ui}/runs/flow-run/{run.id}", out / "prefect-flow-run.png", tab="Task Runs",
              must_show=[run.name, "recall compose-params", "evaluate@01"], height=1200)
        shoot(driver, f"{ui}/artifacts/artifact/{artifact.id}", out / "prefect-artifacts.png",
              must_show=[args.artifact], height=1000)
    finally:
        if driver is not None:
            driver.quit()
        stop(server)


def chromium():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1600,1000"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)


def shoot(driver, url: str, path: Path, must_show: list[str], height: int, tab: str | None = None,
          timeout: float = 90) -> None:
    """Open ``url`` in a page ``height`` pixels high, wait until every text of ``must_show`` is on the page and the page has
    settled (the graph is drawn on a canvas after its data arrives), then save it. ``tab``:
    the label of a tab of the page to open first."""
    from selenium.webdriver.common.by import By

    driver.set_window_size(1600, height)
    driver.get(url)
    # The window's size includes the browser's own bars: grow it until the page gets ``height``.
    inner = driver.execute_script("return window.innerHeight")
    driver.set_window_size(1600, height + (height - inner))
    deadline = time.monotonic() + timeout
    while tab:
        buttons = [b for b in driver.find_elements(By.XPATH, f"//li[contains(@class, 'p-tab')][normalize-space()='{tab}']")
                   if b.is_displayed()]
        if buttons:
            buttons[0].click()
            break
        if time.monotonic() > deadline:
            raise SystemExit(f"{url}: no tab {tab!r}")
        time.sleep(1)
    while True:
        text = driver.find_element(By.TAG_NAME, "body").text
        missing = [wanted for wanted in must_show if wanted not in text]
        if not missing:
            break
        if time.monotonic() > deadline:
            raise SystemExit(f"{url}: {missing} never appeared; the page showed:\n{text[:2000]}")
        time.sleep(1)
    time.sleep(5)
    driver.save_screenshot(str(path))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
