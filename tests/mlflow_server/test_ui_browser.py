"""The MLflow UI of a small study, in a real browser: headless Debian Chromium driven by playwright.

Opens the lab server's UI (PostgreSQL backend, basic auth) as a person would, saves a screenshot
of every page in ``$THIGHMRI_SCREENSHOTS`` (default ``<repo>/runs/screenshots``) and checks the
text each page shows, not just that a file was written (the model version page: its model card,
the version's description). Add a page, or text a page must show, in :func:`ui_pages`.

Uses ``/usr/bin/chromium`` (``apt-get install -y chromium``; ``.ci/run`` installs it); playwright
never downloads a browser here.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from mlflow import MlflowClient
from server_helpers import STUDY_GRID, STUDY_MEASURE

from mlflow_server import auth

pytestmark = pytest.mark.slow

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
# As root Chromium needs --no-sandbox; the rest keeps it from calling out (no network here).
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]
SCREENSHOTS = Path(os.environ.get("THIGHMRI_SCREENSHOTS") or Path(__file__).resolve().parents[2] / "runs" / "screenshots")
VIEWPORT = {"width": 1800, "height": 1000}
LOAD_TIMEOUT_MS = 60_000  # a loaded 2-core machine: the first page compiles MLflow's UI bundle
RUN_TABLE_METRICS = ["best_val_acc", "test_acc", "test_baseline_acc", "size_age_test_acc"]  # accuracy beside baselines


@dataclass
class UiPage:
    """A page of the UI: where it is, when it has loaded, what it must show.

    Attributes:
        route: after the server URL, e.g. ``#/models/thigh-leg_strength``.
        ready: playwright selectors (``text=...`` or CSS) whose appearance means the data has loaded.
        expect: texts the page must show once ready (after ``prepare``).
        prepare: the clicks a person makes before looking (expand runs, pick columns).
    """

    route: str
    ready: list[str]
    expect: list[str]
    prepare: Callable | None = None


def _show_runs_with_metrics(page) -> None:
    """Runs table: hide unused columns, add accuracy and baseline columns, expand launch → cells → trials."""
    page.get_by_role("button", name="Columns").click()
    for title in ["Dataset", "Source", *RUN_TABLE_METRICS]:
        page.locator(f'[class*="tree-node-content-wrapper"][title="{title}"]').click()
    page.keyboard.press("Escape")
    expanders = page.locator('button[data-component-id*="runnamecellrenderer"]')
    i = 0
    while i < expanders.count():  # expanding a run adds its children's expanders below it
        expanders.nth(i).click()
        page.wait_for_timeout(300)
        i += 1


def _filter_metrics(page) -> None:
    """Run page: the metrics whose names hold 'acc' (accuracies, baselines, CIs), scrolled into view."""
    page.get_by_placeholder("Search metrics").fill("acc")
    page.get_by_text("test_baseline_acc", exact=True).scroll_into_view_if_needed()


def _open_description(page) -> None:
    """Model version page: show the Description section holding the model card (MLflow opens it
    when the version has a description; otherwise a click on its title does), scrolled into view."""
    card = page.get_by_text("Intended use")
    titles = page.get_by_text("Description")
    for i in range(min(titles.count(), 5)):
        if card.count():
            break
        titles.nth(i).click()
        page.wait_for_timeout(500)
    if card.count():
        card.first.scroll_into_view_if_needed()
    elif os.environ.get("THIGHMRI_UI_DEBUG"):  # what the page holds, to adapt this to a new UI
        Path(os.environ["THIGHMRI_UI_DEBUG"]).write_text(page.content())


def _link_to_run(run) -> str:
    return f'a[href*="/runs/{run.info.run_id}"]'


def ui_pages(study: dict) -> dict[str, UiPage]:
    """The pages to check for ``study`` (see :func:`study_ids`), by screenshot name."""
    cell, model = study["cell"], study["model"]
    return {
        "launch_runs": UiPage(
            route=f"#/experiments/{study['experiment_id']}?workflowType=machine_learning",
            ready=[f"text={study['launch'].info.run_name}"],
            prepare=_show_runs_with_metrics,
            expect=[study["launch"].info.run_name, cell.info.run_name, *[t.info.run_name for t in study["trials"]],
                    *RUN_TABLE_METRICS, repr(cell.data.metrics["test_acc"]), repr(cell.data.metrics["test_baseline_acc"]),
                    f"{len(study['trials']) + 2} matching runs", model]),
        "cell_run": UiPage(
            route=f"#/experiments/{study['experiment_id']}/runs/{cell.info.run_id}",
            ready=[_link_to_run(study["launch"]), *[_link_to_run(t) for t in study["trials"]]],  # parent, children
            prepare=_filter_metrics,
            expect=["test_acc", "test_acc_ci_low", "test_acc_ci_high", "test_baseline_acc", "size_age_test_acc",
                    repr(cell.data.metrics["test_acc"]), repr(cell.data.metrics["test_baseline_acc"]), model]),
        "registered_model": UiPage(
            route=f"#/models/{model}",
            ready=["text=Version 1", "text=@ champion"],
            expect=[model, "Version 1", "@ candidate", "@ champion", cell.info.run_name]),
        # the model card is the version's description (study/promote.py step 1)
        "model_version": UiPage(
            route=f"#/models/{model}/versions/{study['version'].version}",
            ready=["text=@ champion", _link_to_run(cell)],  # the source run comes in a later request
            prepare=_open_description,
            expect=[f"Version {study['version'].version}", "@ candidate", "@ champion", "Source Run",
                    cell.info.run_name, "selected_by", "promotion_reason",
                    f"Model card: thigh-{STUDY_MEASURE}", "Intended use", "Not a medical device",
                    "Performance against baselines", "Training-majority baseline", "Body-size baseline (size+age) accuracy",
                    "Known limits"]),
    }


@pytest.fixture(scope="module")
def study_ids(lab_study, monkeypatch_module) -> dict:
    """The study's experiment, runs and model version, read through MLflow's client."""
    creds = auth.read_credentials(lab_study["server"].home)
    monkeypatch_module.setenv("MLFLOW_TRACKING_USERNAME", creds.username)
    monkeypatch_module.setenv("MLFLOW_TRACKING_PASSWORD", creds.password)
    client = MlflowClient(lab_study["server"].url)
    experiment = client.get_experiment_by_name(STUDY_GRID["name"])
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    by_type = {t: [r for r in runs if r.data.tags.get("run_type") == t] for t in ("launch", "cell", "trial")}
    (launch,), (cell,) = by_type["launch"], by_type["cell"]
    model = f"thigh-{STUDY_MEASURE}"
    return {"experiment_id": experiment.experiment_id, "launch": launch, "cell": cell, "trials": by_type["trial"],
            "model": model, "version": client.get_model_version_by_alias(model, "champion"),
            "url": lab_study["server"].url, "credentials": creds}


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} not found; install it with `apt-get install -y chromium` "
                    "(`make test` runs `make system-deps`, which does)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture(scope="module")
def signed_in(browser, study_ids):
    """A browser context that answers the server's basic-auth challenge with the admin's password."""
    creds = study_ids["credentials"]
    context = browser.new_context(http_credentials={"username": creds.username, "password": creds.password},
                                  viewport=VIEWPORT)
    context.set_default_timeout(LOAD_TIMEOUT_MS)
    yield context
    context.close()


def _wait_for_texts(page, texts: list[str], timeout_s: float = LOAD_TIMEOUT_MS / 1000) -> list[str]:
    """Wait until the page shows every text; the ones still missing at ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        shown = " ".join(page.locator("body").inner_text().split())  # any run of spaces (or &nbsp;) as one
        missing = [text for text in texts if " ".join(text.split()) not in shown]
        if not missing or time.monotonic() > deadline:
            return missing
        page.wait_for_timeout(500)


@pytest.mark.parametrize("name", ["launch_runs", "cell_run", "registered_model", "model_version"])
def test_ui_page_shows_the_study(name, signed_in, study_ids):
    spec = ui_pages(study_ids)[name]
    page = signed_in.new_page()
    try:
        response = page.goto(f"{study_ids['url']}/{spec.route}")
        assert response is not None and response.status == 200
        for selector in spec.ready:
            page.locator(selector).first.wait_for()
        close_assistant = page.get_by_role("button", name="Close")  # MLflow's chat panel covers a third
        if close_assistant.count():
            close_assistant.first.click()
        if spec.prepare:
            spec.prepare(page)
        missing = _wait_for_texts(page, spec.expect)  # the UI polls: no "network idle" to wait for
        page.wait_for_timeout(500)  # let the last rows paint
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        shot = SCREENSHOTS / f"{name}.png"
        page.screenshot(path=str(shot))
        assert not missing, f"{name} ({shot}) does not show {missing}"
        assert shot.stat().st_size > 20_000, f"{shot} looks blank"
    finally:
        page.close()


def test_ui_without_credentials_is_refused(browser, study_ids):
    from playwright.sync_api import Error as PlaywrightError

    context = browser.new_context(viewport=VIEWPORT)  # no password: headless Chromium cannot ask for one
    try:
        page = context.new_page()
        try:
            status = page.goto(f"{study_ids['url']}/#/models/{study_ids['model']}").status
        except PlaywrightError as exc:
            assert "ERR_INVALID_AUTH_CREDENTIALS" in str(exc)
        else:
            assert status == 401
        api = context.request.get(f"{study_ids['url']}/ajax-api/2.0/mlflow/registered-models/get"
                                  f"?name={study_ids['model']}")
        assert api.status == 401 and study_ids["cell"].info.run_id not in api.text()
    finally:
        context.close()
