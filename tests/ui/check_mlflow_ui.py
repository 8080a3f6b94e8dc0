"""Look at the MLflow UI as a user does: ``mlflow ui`` on loopback, headless Chromium, screenshots and checks.

Usage (``make ui-check``, after ``make demo``)::

    python tests/ui/check_mlflow_ui.py [--backend-store-uri sqlite:///mlflow.db] [--out ui-check]

It opens three pages, saves a screenshot of each and checks what the page says (its rendered DOM):

1. the experiment: it opens on the runs table (a model-training experiment), not the GenAI view;
2. a training stage's run: its metric charts (loss);
3. the newest version of the registered model ``m2d2-plus``: its tags (lineage) and description.

A fourth screenshot shows the experiment from a bare link, as MLflow 3.17 opens it by default (see below).

Needs Debian's ``chromium`` (``apt-get install chromium``) or ``CHROMIUM=/path/to/chrome``. Exits 1 with the failed
checks listed, 0 when every page shows what it should.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _chromium() -> str:
    for name in (os.environ.get("CHROMIUM", ""), "chromium", "chromium-browser", "google-chrome"):
        if name and shutil.which(name):
            return shutil.which(name)
    raise SystemExit("no Chromium found: apt-get install chromium (Debian), or set CHROMIUM=/path/to/chrome")


def _browse(browser: str, url: str, png: Path, budget_ms: int) -> str:
    """Screenshot ``url`` into ``png`` and return its DOM after ``budget_ms`` of (virtual) time for the app to load."""
    common = [browser, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
              "--window-size=1600,1000", f"--virtual-time-budget={budget_ms}", "--run-all-compositor-stages-before-draw"]
    subprocess.run([*common, f"--screenshot={png}", url], capture_output=True, timeout=120, check=True)
    return subprocess.run([*common, "--dump-dom", url], capture_output=True, text=True, timeout=120,
                          check=True).stdout


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--backend-store-uri", default="sqlite:///mlflow.db")
    parser.add_argument("--out", default="ui-check", type=Path)
    parser.add_argument("--model", default="m2d2-plus", help="registered model whose page is checked")
    parser.add_argument("--budget-ms", type=int, default=20000, help="virtual time a page gets to render")
    args = parser.parse_args(argv)

    from mlflow import MlflowClient

    browser = _chromium()
    client = MlflowClient(tracking_uri=args.backend_store_uri, registry_uri=args.backend_store_uri)
    experiment = client.get_experiment_by_name("m2d2")
    if experiment is None:
        raise SystemExit(f"no experiment 'm2d2' in {args.backend_store_uri}: run `make demo` first")
    runs = client.search_runs([experiment.experiment_id], "tags.`m2d2.stage` = 'stage1'", max_results=1)
    if not runs:
        raise SystemExit("no stage1 run to look at")
    stage_run = runs[0].info.run_id
    newest = max(client.search_model_versions(f"name = '{args.model}'"), key=lambda v: int(v.version))

    args.out.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", args.backend_store_uri,
                               "--host", "127.0.0.1", "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    failures: list[str] = []
    started = time.perf_counter()
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"{base}/health", timeout=2)
                break
            except OSError:
                time.sleep(1)
        else:
            raise SystemExit("mlflow ui did not come up in 120 s")
        # MLflow 3.17 picks its GenAI or model-training navigation from a UI-wide switch (the URL's workflowType,
        # else the last choice in the browser's storage, else GenAI), not from the experiment's kind tag: the
        # links this project prints carry workflowType=machine_learning, and so do these.
        ml = "?workflowType=machine_learning"
        exp = f"{base}/#/experiments/{experiment.experiment_id}"
        pages = {
            "experiment": (f"{exp}{ml}", ["Runs", "pipeline-", "corpus ("], ["Judges"]),  # runs with their datasets
            "stage-run-charts": (f"{exp}/runs/{stage_run}/model-metrics{ml}", ["Model metrics", "loss_m2d"], []),
            "registry": (f"{base}/#/models/{args.model}/versions/{newest.version}{ml}",
                         [f"Version {newest.version}", "m2d2.variant", "m2d2.data_snapshot"], []),
            "experiment-default": (exp, [], []),  # what a bare link shows (GenAI unless the user switched)
        }
        for name, (url, must, must_not) in pages.items():
            png = args.out / f"{name}.png"
            dom = _browse(browser, url, png, args.budget_ms)
            (args.out / f"{name}.html").write_text(dom)
            missing = [text for text in must if text not in dom]
            present = [text for text in must_not if f">{text}<" in dom]
            status = "ok" if not missing and not present else "FAILED"
            print(f"{name:18s} {status:6s} {png} ({png.stat().st_size // 1024} KB)"
                  + (f" missing {missing}" if missing else "") + (f" unexpected {present}" if present else ""))
            if status != "ok":
                failures.append(name)
    finally:
        server.terminate()
        server.wait(timeout=30)
    print(f"{len(pages) - len(failures)}/{len(pages)} pages as expected in {time.perf_counter() - started:.0f} s; "
          f"screenshots in {args.out}/")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
