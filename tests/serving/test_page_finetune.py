"""The web page's Fine-tune tab in headless Chromium, against the real ingress (serving.http's FastAPI app under
uvicorn on 127.0.0.1) with a real engine over the tiny pipeline and a SQLite registry, and a fake cluster
(tests/serving/test_finetune.py's FakeCluster) that the test moves along: the page uploads the toy dataset through
its file input, starts a job, shows its events as they arrive and ``succeeded``, then draws with the new model;
a refused upload shows the validator's problems; a job failing the gate shows its reasons; a reload follows the job
again and Cancel stops it. Every request carries the API key typed into the page."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest

from tests.serving.test_app import free_port
from tests.serving.test_files import tar_bytes, zip_bytes
from tests.serving.test_finetune import PASSED, FakeCluster, write_summary

pytestmark = pytest.mark.slow
KEY_ENV, KEY = "LORAFLEET_TEST_WEB_KEY", "web-test-key"
MODEL = "default--web-style"  # the key of api_key_env is the default tenant


class EngineGenerator:
    """The Generator deployment's two methods the page reaches (``generate``, ``models``) over a real engine,
    without Ray: each request is one pass."""

    def __init__(self, args):
        from serving.engine import Engine

        self.torch = ThreadPoolExecutor(max_workers=1)  # as the deployment: every torch call on one thread
        self.engine = self.torch.submit(Engine.from_args, args).result()

    async def generate(self, req, epoch: int = 0) -> dict:
        return await asyncio.wrap_future(self.torch.submit(self._generate, req))

    def _generate(self, req) -> dict:
        from serving.app import encode, error_result

        try:
            [result] = self.engine.generate([self.engine.prepare(req)])
        except Exception as exc:  # noqa: BLE001 - as the deployment does: every failure is a typed error
            return error_result(exc)
        return error_result(result) if isinstance(result, Exception) else encode(result)

    async def models(self, tenant=None) -> dict:
        from serving.catalog import model_cards

        cards = await asyncio.to_thread(model_cards, self.engine.resolver, set(self.engine.adapters.keys()), tenant)
        return {"object": "list", "data": cards}


@pytest.fixture(scope="module")
def site(tmp_path_factory, tiny_pipe_dir):
    """The ingress on a free port with its fine-tuning queue polling a FakeCluster every 0.2 s."""

    from evaluation.registry import client_for
    from serving.http import Api
    from tests.serving.conftest import tiny_serve_args

    tmp = tmp_path_factory.mktemp("web-finetune")
    (tmp / "registry").mkdir()
    registry = f"sqlite:///{tmp / 'registry' / 'mlflow.db'}"
    client_for(registry).search_registered_models()  # the schema exists before the catalog's thread reads it
    # champion.poll_s: the model listing is read once, at the page's first GET /v1/models, so when the job succeeds
    # it lags the registry as a deployed one may (for up to champion.poll_s); the page must still offer the model
    overrides = {"tracking_uri": registry, "champion.poll_s": 3600, "api_key_env": KEY_ENV, "warmup": False,
                 "deployment.request_timeout_s": 600, "finetune.poll_s": 0.2}  # fmt: skip
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(KEY_ENV, KEY)
        args = tiny_serve_args(tiny_pipe_dir, {}, tmp / "cache", **overrides)
        api = Api.func_or_class.__mro__[1](_remote(EngineGenerator(args)), args, _remote(SimpleNamespace()))
        cluster = FakeCluster()
        api.finetune._submitter = cluster  # before the poller's first tick (poll_s after the start)
        try:
            with served(api, mp) as url:
                yield SimpleNamespace(url=url, api=api, cluster=cluster, registry=registry, tmp=tmp)
        finally:
            api.finetune.stop()


@contextlib.contextmanager
def served(api, mp: pytest.MonkeyPatch):
    """``api`` (an ``Api`` instance) as the ingress of serving.http's FastAPI app under uvicorn on 127.0.0.1; yields
    its base URL and stops the server on exit."""
    import uvicorn
    from ray import serve

    from serving.http import web

    mp.setattr(serve, "get_replica_context", lambda: SimpleNamespace(servable_object=api))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(web, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    until(lambda: server.started, 60, "uvicorn did not start")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


def _remote(target):
    from tests.serving.test_http import Remote

    return Remote(target)


def until(condition, limit_s: float, what: str | None):
    """Wait for ``condition()`` to be truthy (polled every 0.1 s) and return it; after ``limit_s``, fail with
    ``what`` (None: return the last falsy value)."""
    deadline, out = time.monotonic() + limit_s, None
    while time.monotonic() < deadline:
        if out := condition():
            return out
        time.sleep(0.1)
    if what is None:
        return out
    pytest.fail(f"{what} within {limit_s} s")


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        if os.environ.get("LORAFLEET_REQUIRE_BROWSER") == "1":
            pytest.fail("chromium/chromedriver missing: apt-get install chromium chromium-driver")
        pytest.skip("needs Debian's chromium and chromium-driver")
    from selenium import webdriver

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    profile = tmp_path_factory.mktemp("chromium-profile")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={profile}"):  # fmt: skip
        options.add_argument(flag)
    b = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver))
    try:
        yield b
    finally:
        b.quit()


def open_tab(browser, site):
    """The page with no job remembered from an earlier test (sessionStorage), the key typed, the Fine-tune tab."""
    from selenium.webdriver.common.by import By

    browser.get(site.url + "/")
    browser.execute_script("sessionStorage.clear()")
    browser.get(site.url + "/")
    browser.find_element(By.ID, "key").send_keys(KEY)
    browser.find_element(By.ID, "tab-finetune").click()
    assert browser.find_element(By.ID, "finetune").is_displayed()
    assert not browser.find_element(By.ID, "generate").is_displayed()
    return lambda ident: browser.find_element(By.ID, ident)


def texts(browser, selector: str) -> list[str]:
    from selenium.webdriver.common.by import By

    return [e.text for e in browser.find_elements(By.CSS_SELECTOR, selector)]


def test_a_refused_upload_shows_the_validators_problems_as_text(site, browser, tmp_path):
    from selenium.webdriver.common.by import By

    name = "<img src=x onerror=alert(1)>.zip"  # the server echoes the name in its message: text, never markup
    archive = tmp_path / name
    archive.write_bytes(zip_bytes({"readme.md": b"no images here"}))
    el = open_tab(browser, site)
    el("ft-file").send_keys(str(archive))
    el("ft-trigger").send_keys("sks")
    el("ft-start").click()
    status = until(lambda: "400" in el("ft-status").text and el("ft-status").text, 60, "no refusal shown")
    assert f"the dataset in {name} has 1 error(s)" in status and el("ft-status").get_attribute("class") == "error"
    problems = until(lambda: texts(browser, "#ft-problems li"), 10, "no problems listed")
    assert any(p.startswith("error - .: ") for p in problems) and any("readme.md" in p for p in problems)
    assert not browser.find_elements(By.CSS_SELECTOR, "#ft-status img, #ft-problems img")
    assert el("ft-start").is_enabled() and not site.cluster.submitted and not site.api.finetune.store.all()


def test_upload_job_events_success_then_an_image_from_the_new_model(site, browser, toy_dataset, tiny_adapters):
    from selenium.webdriver.support.ui import Select

    from tests.serving.conftest import register_adapter

    archive = toy_dataset.parent / "toy-sks.tar.gz"
    archive.write_bytes(tar_bytes(toy_dataset))
    el = open_tab(browser, site)
    el("ft-file").send_keys(str(archive))
    assert el("ft-picked").text.startswith("toy-sks.tar.gz (")
    el("ft-trigger").send_keys("sks")
    el("ft-suffix").send_keys("web-style")
    el("ft-epochs").send_keys("2")
    el("ft-start").click()

    [job_id] = until(lambda: site.cluster.submitted, 60, "the page's job was not submitted")
    record = site.api.finetune.store.load(job_id)
    assert (record.trigger, record.fine_tuned_model, record.hyperparameters.n_epochs) == ("sks", MODEL, 2)
    assert record.model == "base" and record.tenant == "default"
    until(lambda: any("fine-tuning job created" in t for t in texts(browser, "#ft-events li")), 30, "no first event")

    # running: a stage's event appears while the job runs, without a reload
    site.cluster.jobs[job_id] = "RUNNING"
    write_summary(site.api.finetune.store, job_id, {"validate": PASSED["validate"], "tune": {"status": "running"}},
                  "running")  # fmt: skip
    until(lambda: any("stage tune: running" in t for t in texts(browser, "#ft-events li")), 30, "no live event")
    until(lambda: el("ft-status").text == f"job {job_id}: running", 30, "status not running")
    assert el("ft-cancel").is_displayed() and not el("ft-start").is_enabled()

    # the pipeline registers the adapter (here: a tiny random one in the SQLite registry) and ends
    assert register_adapter(site.registry, MODEL, tiny_adapters["ad1"], status="passed") == "1"
    write_summary(site.api.finetune.store, job_id, {**PASSED, "register": {**PASSED["register"], "model": MODEL,
                                                                           "version": "1"}})  # fmt: skip
    site.cluster.jobs[job_id] = "SUCCEEDED"
    until(lambda: el("ft-use").is_displayed(), 60, "no success shown")  # shown last, once the model is selected
    assert el("ft-status").text == f"job {job_id}: succeeded - {MODEL} is served now"
    events = texts(browser, "#ft-events li")
    assert "fine-tuning job created" in events[0] and "served now" in events[-1]
    assert len(events) == len(set(events)) == len(site.api.finetune.store.load(job_id).events)  # each once
    chosen = Select(el("model")).first_selected_option
    assert (
        chosen.get_attribute("value") == MODEL and chosen.get_attribute("textContent") == f"{MODEL} (just fine-tuned)"
    )
    assert not el("ft-cancel").is_displayed() and el("ft-start").is_enabled()
    browser.save_screenshot(str(toy_dataset.parent / "finetune-tab.png"))

    # generate with it: the generate tab, the new model selected, one image
    el("ft-use").click()
    assert el("generate").is_displayed() and not el("finetune").is_displayed()
    el("steps").clear()
    el("steps").send_keys("2")  # a busy 2-core machine: two denoising steps tell the models apart
    new = draw(browser, el, f"{MODEL} v1, 1 image(s)")
    Select(el("model")).select_by_value("")  # the same request from the base model: the adapter changed the image
    assert draw(browser, el, "base, 1 image(s)") != new
    browser.save_screenshot(str(toy_dataset.parent / "generate-tab.png"))


def draw(browser, el, status: str) -> str:
    """Click Generate, wait for the status line to start with ``status``, return the drawn image's data URL."""
    from selenium.webdriver.common.by import By

    el("go").click()
    if not until(lambda: el("status").text.startswith(status), 300, None):
        pytest.fail(f"the status line says {el('status').text!r}, not {status!r}...")
    [image] = browser.find_elements(By.CSS_SELECTOR, "#images img.result")
    return image.get_attribute("src")


def start_job(browser, site, el, toy_dataset, suffix: str) -> str:
    """Upload the toy dataset through the page and start a 1-epoch job; returns its id once submitted."""
    archive = toy_dataset.parent / "toy-sks.tar.gz"
    archive.write_bytes(tar_bytes(toy_dataset))
    before = set(site.cluster.submitted)
    el("ft-file").send_keys(str(archive))
    el("ft-trigger").send_keys("sks")
    el("ft-suffix").send_keys(suffix)
    el("ft-epochs").send_keys("1")
    el("ft-start").click()
    [job_id] = until(lambda: [j for j in site.cluster.submitted if j not in before], 60, "the job was not submitted")
    return job_id


def test_a_job_failing_the_gate_shows_the_gates_reasons(site, browser, toy_dataset):
    from selenium.webdriver.common.by import By

    el = open_tab(browser, site)
    job_id = start_job(browser, site, el, toy_dataset, "gate-fails")
    reasons = "no adapter passed the gate — candidate 1 (trial 0): concept_gain 0.02 < 0.11"
    stages = {
        **{k: PASSED[k] for k in ("validate", "tune", "evaluate")},
        "gate": {"status": "failed", "error": reasons},
    }
    write_summary(site.api.finetune.store, job_id, stages, "failed")
    site.cluster.jobs[job_id] = "FAILED"
    until(lambda: el("ft-status").text.startswith(f"job {job_id}: failed"), 60, "no failure shown")
    assert el("ft-status").text == f"job {job_id}: failed - gate: {reasons}"
    assert el("ft-status").get_attribute("class") == "error"
    last = browser.find_elements(By.CSS_SELECTOR, "#ft-events li")[-1]
    assert last.get_attribute("class") == "error" and reasons in last.text
    assert not el("ft-cancel").is_displayed() and el("ft-start").is_enabled() and not el("ft-use").is_displayed()


def test_a_reload_follows_the_job_again_and_cancel_stops_it(site, browser, toy_dataset):
    store = site.api.finetune.store
    el = open_tab(browser, site)
    job_id = start_job(browser, site, el, toy_dataset, "reloaded")
    site.cluster.jobs[job_id] = "RUNNING"
    write_summary(store, job_id, {"validate": PASSED["validate"], "tune": {"status": "running"}}, "running")
    until(lambda: any("stage tune: running" in t for t in texts(browser, "#ft-events li")), 30, "no live event")

    def reload_and_type_the_key():
        browser.refresh()
        assert el("finetune").is_displayed()  # the page opens on the job it followed
        if not el("key").get_attribute("value"):  # the key is never stored: until it is typed, the page says so
            until(lambda: f"type your API key above to follow job {job_id}" in el("ft-status").text, 30, "no hint")
            el("key").send_keys(KEY)

    reload_and_type_the_key()
    until(lambda: el("ft-status").text == f"job {job_id}: running", 30, "the reloaded page does not follow the job")
    until(lambda: any("stage tune: running" in t for t in texts(browser, "#ft-events li")), 30, "events not shown")
    events = texts(browser, "#ft-events li")
    assert "fine-tuning job created" in events[0] and len(events) == len(set(events)) == len(store.load(job_id).events)
    assert el("ft-cancel").is_displayed() and not el("ft-start").is_enabled()

    el("ft-cancel").click()
    until(lambda: job_id in site.cluster.stopped, 30, "Cancel did not stop the Ray job")
    until(lambda: el("ft-status").text == f"job {job_id}: cancelled", 30, "no cancellation shown")
    assert any("cancel requested" in t for t in texts(browser, "#ft-events li"))
    assert not el("ft-cancel").is_displayed() and el("ft-start").is_enabled()
    assert store.load(job_id).status == "cancelled"

    reload_and_type_the_key()  # an ended job is shown as it ended, its events once
    until(lambda: el("ft-status").text == f"job {job_id}: cancelled", 30, "the ended job is not shown after a reload")
    events = texts(browser, "#ft-events li")
    assert len(events) == len(set(events)) == len(store.load(job_id).events)
    assert not el("ft-cancel").is_displayed() and el("ft-start").is_enabled()


def test_a_remembered_job_this_key_cannot_see_is_dropped(site, browser):
    el = open_tab(browser, site)
    gone = "ftjob-" + "0" * 24  # e.g. followed under another tenant's key
    browser.execute_script("sessionStorage.setItem('lorafleet.finetune.job', arguments[0])", gone)
    browser.refresh()
    if not el("key").get_attribute("value"):
        el("key").send_keys(KEY)
    until(lambda: "is not found for this API key" in el("ft-status").text, 30, "no not-found message")
    assert el("ft-status").text.startswith(f"job {gone} is not found for this API key (404: ")
    assert el("ft-start").is_enabled() and not el("ft-cancel").is_displayed()
    assert browser.execute_script("return sessionStorage.getItem('lorafleet.finetune.job')") is None
