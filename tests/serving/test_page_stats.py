"""The ``/stats`` page in headless Chromium, against the real ingress (serving.http's FastAPI app under uvicorn on
127.0.0.1) over a generator whose figures come from a real Recorder: the summary figures, one bar per model
version, the versions and registry tables, prompts shown as text (never as markup), and the admin key's refusal."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest

from tests.serving.test_http import Remote
from tests.serving.test_page_finetune import browser, served, until  # noqa: F401 - the Chromium fixture
from tests.serving.test_production import CARDS, rec, replica

KEY_ENV, KEY = "LORAFLEET_TEST_PAGE_STATS_KEY", "page-stats-key"
HOSTILE = '<img src=x id=injected onerror="document.title=1"> a prompt'


class StatsGenerator:
    """The generator replica's face for the page: ``production`` from a real Recorder, ``models`` with the
    registry's versions."""

    def __init__(self):
        now = time.time()
        records = [rec("champion", "2", s, t=now - 120) for s in (0.5, 1.0, 1.5)]
        records += [rec("champion", "2", 2.0, t=now - 60, prompt=HOSTILE), rec("champion", "2", 4.0, "500", t=now)]
        records += [rec("toy-lora/1", "1", 0.8, t=now), rec("base", "", 0.3, t=now, prompt="a blue square")]
        self.snapshot = replica(11, records)

    async def production(self) -> dict:
        return self.snapshot

    async def models(self, tenant=None) -> dict:
        return {"object": "list", "data": CARDS, "registry": None}


@pytest.fixture(scope="module")
def site():
    from serving.config import ServeArgs
    from serving.http import Api
    from serving.shared_stores import ImageUrls

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(KEY_ENV, KEY)
        args = ServeArgs(champion={"model": None}, default_model="base", api_key_env=KEY_ENV,
                         tenants={"keys_env": None}, feedback={"enabled": False})  # fmt: skip
        urls = ImageUrls.func_or_class(args.image_urls.model_dump())
        api = Api.func_or_class.__mro__[1](Remote(StatsGenerator()), args, Remote(urls))
        with served(api, mp) as url:
            yield SimpleNamespace(url=url)


def test_the_stats_page_draws_the_figures_and_shows_prompts_as_text(site, browser):  # noqa: F811
    from selenium.webdriver.common.by import By

    browser.get(site.url + "/stats")
    status = browser.find_element(By.ID, "status")
    until(lambda: "API key" in status.text, 30, f"no refusal shown without a key (shows {status.text!r})")
    browser.find_element(By.ID, "key").send_keys(KEY)
    browser.find_element(By.ID, "load").click()
    until(lambda: status.text.startswith("updated"), 30, f"no figures (shows {status.text!r})")

    figures = {
        d.find_element(By.TAG_NAME, "dt").text: d.find_element(By.TAG_NAME, "dd").text
        for d in browser.find_elements(By.CSS_SELECTOR, "#summary div")
    }
    assert figures["generations"] == "7" and figures["5xx error rate"] == "14.3 %", figures
    assert figures["p50 latency"] == "0.90 s" and figures["replicas"] == "1 of 1", figures  # 0.3 .5 .8 1 1.5 2 -> 0.9
    bars = browser.find_elements(By.CSS_SELECTOR, "#per-model rect")
    assert sorted(b.get_attribute("data-model") for b in bars) == ["base", "champion v2", "toy-lora/1 v1"]
    minutes = browser.find_elements(By.CSS_SELECTOR, "#timeline rect")
    assert sum(int(m.get_attribute("data-requests")) for m in minutes) == 7 and len(minutes) == 3
    assert browser.find_elements(By.CSS_SELECTOR, "#timeline polyline")  # the p50 line
    rows = [[td.text for td in tr.find_elements(By.TAG_NAME, "td")] for tr in
            browser.find_elements(By.CSS_SELECTOR, "#versions tbody tr")]  # fmt: skip
    champion = next(r for r in rows if r[0] == "champion")
    assert champion[1:5] == ["2", "5", "80.0 %", "1"], champion
    registry = [[td.text for td in tr.find_elements(By.TAG_NAME, "td")] for tr in
                browser.find_elements(By.CSS_SELECTOR, "#registry tbody tr")]  # fmt: skip
    assert registry == [["toy-lora", "1", "-", "rejected"], ["toy-lora", "2", "champion", "passed"]]
    prompts = [li.text for li in browser.find_elements(By.CSS_SELECTOR, "#prompts li")]
    assert prompts[0] == "a red circle (5)" and f"{HOSTILE} (1)" in prompts, prompts
    assert not browser.find_elements(By.ID, "injected") and browser.title == "lorafleet - production"
    assert "no ratings" in status.text  # feedback is off on this server
