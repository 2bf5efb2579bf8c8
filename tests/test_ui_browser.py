"""Comparing runs in the MLflow UI as a researcher does, in a real browser: two finished runs of
different configs made by the real command, ``mlflow ui`` on 127.0.0.1 over their store, and
Chromium (Debian's package, driven by Playwright's Python client) following the printed addresses:
the runs table with both runs by name and their recall columns, the compare view of the two (run
details, the parameters that differ), and one run's head heatmap artifact. Screenshots go to the test's tmp dir, or to the directory in
``RETRIEVAL_HEADS_SCREENSHOTS`` (``docs/images`` refreshes the README's copies).

Needs what ``WITH_BROWSER=1 bash setup.sh`` installs (CI installs it); nothing is downloaded here.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
from pathlib import Path

import matplotlib.pyplot as plt
import pytest
from framework_cli import TINY_GRID, local_store, run, serving

CHROMIUM = shutil.which("chromium")

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.optional_part,
    pytest.mark.skipif(CHROMIUM is None or importlib.util.find_spec("playwright") is None,
                       reason="the browser test needs Chromium and Playwright: WITH_BROWSER=1 bash setup.sh"),
]

DETECT = ["+detector=attn_mass", "detector.threshold=null", "detector.top_k=5", *TINY_GRID]
INTERVENTIONS = ["zero_lowfreq", "head_mask"]


def addresses(stdout: str, url: str) -> tuple[str, str]:
    """The run page and runs table addresses a run printed, on the UI at ``url``."""
    run_page = re.search(r"^run page: (\S+)$", stdout, re.M).group(1)
    runs_table = re.search(r"runs table: (\S+)$", stdout, re.M).group(1)
    return tuple(address.replace("http://127.0.0.1:5000", url) for address in (run_page, runs_table))


def dismiss(page, *buttons: str) -> None:
    """Close side panels and banners that cover the table (the UI's assistant, the view banner)."""
    for name in buttons:
        button = page.get_by_role("button", name=name, exact=True)
        if button.count() and button.first.is_visible():
            button.first.click()


@pytest.fixture
def two_runs(tmp_path) -> tuple[Path, dict[str, str]]:
    """A directory whose local store holds two finished runs that differ in their intervention,
    made by the real command, and what each run printed."""
    work = tmp_path / "work"
    work.mkdir()
    printed = {}
    for intervention in INTERVENTIONS:
        result = run(work, *DETECT, f"+intervention={intervention}")
        assert result.returncode == 0, result.stderr[-3000:]
        printed[intervention] = result.stdout
        assert f"after `mlflow ui --backend-store-uri sqlite:///{work / 'mlruns' / 'mlflow.db'}`" in result.stdout
    return work, printed


def test_compare_two_runs_in_the_browser(two_runs, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    shots = Path(os.environ.get("RETRIEVAL_HEADS_SCREENSHOTS") or tmp_path / "screenshots").resolve()
    shots.mkdir(parents=True, exist_ok=True)
    work, printed = two_runs
    client = local_store(work)
    experiment = client.get_experiment_by_name("retrieval-heads")
    runs = {r.data.params["intervention.name"]: r for r in client.search_runs([experiment.experiment_id])}
    assert sorted(runs) == sorted(INTERVENTIONS) and all(r.info.status == "FINISHED" for r in runs.values())
    names = {key: r.info.run_name for key, r in runs.items()}
    for key, name in names.items():
        assert name.startswith(f"smollm2_135m-attn_mass-{key}-niah-seed0-"), name

    with serving(tmp_path / "ui", "ui", "--workers", "1", "--backend-store-uri",
                 f"sqlite:///{work / 'mlruns' / 'mlflow.db'}") as ui, sync_playwright() as playwright:
        url = ui.url
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"], headless=True)
        page = browser.new_page(viewport={"width": 2000, "height": 760})  # a fresh profile: no remembered choices
        expect.set_options(timeout=120_000)  # the first page load fetches and runs the UI's bundle
        run_page, runs_table = addresses(printed["zero_lowfreq"], url)

        # 1. the runs table, in the project's saved view, with both runs and their recall columns
        page.goto(runs_table)
        for name in names.values():
            expect(page.get_by_role("link", name=name)).to_be_visible()
        expect.set_options(timeout=30_000)
        page.set_default_timeout(30_000)
        dismiss(page, "Close", "Hide banner")
        expect(page.get_by_role("button", name="Model training")).to_be_visible()  # not the GenAI overview
        for key, r in runs.items():
            row = page.locator(f'.ag-row[row-id="{r.info.run_id}"]')
            for condition in ("baseline", "treatment", "control"):
                cell = row.locator(f'[col-id="metrics.`recall/{condition}`"]')
                expect(cell).to_have_text(f"{r.data.metrics[f'recall/{condition}']:g}")
            expect(row.locator('[col-id="attributes.`Dataset`"]')).to_contain_text("niah-eval-seed0-len256")
        page.screenshot(path=shots / "runs-table.png", clip={"x": 0, "y": 0, "width": 2000, "height": 330})

        # 2. both selected, compared: run details, and the parameters that differ side by side
        for r in runs.values():
            page.locator(f'.ag-row[row-id="{r.info.run_id}"]').get_by_role("checkbox").filter(visible=True).check()
        page.get_by_role("button", name="Compare", exact=True).click()
        page.set_viewport_size({"width": 1800, "height": 1150})
        expect(page.get_by_text("Comparing 2 Runs from 1 Experiment")).to_be_visible()
        page.get_by_text("Model training", exact=True).click()  # the compare address leaves the switch to the browser
        page.get_by_text("Visualizations", exact=True).click()  # folded: the table of runs comes first
        page.get_by_text("Show diff only").first.click()  # parameters that differ
        for name in names.values():
            expect(page.get_by_text(name, exact=True)).to_be_visible()
        expect(page.get_by_role("row", name=re.compile(r"intervention\.name.*head_mask.*zero_lowfreq"))).to_be_visible()
        page.screenshot(path=shots / "compare.png")
        page.set_viewport_size({"width": 2000, "height": 760})

        # 3. the run page a run prints, then its head heatmap among the artifacts
        page.goto(run_page)
        expect(page.get_by_role("heading", name=names["zero_lowfreq"])).to_be_visible()
        expect(page.get_by_text("niah-eval-seed0-len256", exact=False).first).to_be_visible()  # Datasets
        page.screenshot(path=shots / "run-page.png")
        page.get_by_role("tab", name="Artifacts").click()
        page.set_viewport_size({"width": 1800, "height": 1250})
        for node in ("detector", "attn_mass", "heatmap.png"):
            page.get_by_text(node, exact=True).click()
        heatmap = page.locator("img[src^='blob:']").first
        expect(heatmap).to_be_visible()
        logged = client.download_artifacts(runs["zero_lowfreq"].info.run_id, "detector/attn_mass/heatmap.png", str(tmp_path))
        height, width = plt.imread(logged).shape[:2]
        assert heatmap.evaluate("image => [image.naturalWidth, image.naturalHeight]") == [width, height]  # that PNG
        page.screenshot(path=shots / "heatmap.png")
        browser.close()
