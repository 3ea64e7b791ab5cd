"""The web page's rating buttons in headless Chromium, against the real ingress (serving.http's FastAPI app under
uvicorn on 127.0.0.1) over a fake generator that gives ids as the real one does, and a real FeedbackStore: thumbs
up, then down (which replaces the first rating), a refusal shown as text, never as markup."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from tests.serving.test_feedback import IdGenerator
from tests.serving.test_http import Remote
from tests.serving.test_page_finetune import browser, served, until  # noqa: F401 - the Chromium fixture

KEY_ENV, KEY = "LORAFLEET_TEST_PAGE_FEEDBACK_KEY", "page-feedback-key"


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    from serving.config import ServeArgs
    from serving.http import Api
    from serving.shared_stores import Feedback, ImageUrls

    tmp = tmp_path_factory.mktemp("web-feedback")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(KEY_ENV, KEY)
        args = ServeArgs(
            champion={"model": None}, default_model="base", api_key_env=KEY_ENV, tenants={"keys_env": None},
            feedback={"root": str(tmp / "feedback"), "max_per_minute": 10},
        )  # fmt: skip
        store = Feedback.func_or_class(args.feedback.model_dump())
        urls = ImageUrls.func_or_class(args.image_urls.model_dump())
        api = Api.func_or_class.__mro__[1](Remote(IdGenerator()), args, Remote(urls), Remote(store))
        with served(api, mp) as url:
            yield SimpleNamespace(url=url, store=store.store, api=api)


def test_thumbs_under_each_image_rate_it_and_a_refusal_is_shown_as_text(site, browser):  # noqa: F811
    from selenium.webdriver.common.by import By

    browser.get(site.url + "/")
    browser.find_element(By.ID, "key").send_keys(KEY)
    browser.find_element(By.ID, "n").clear()
    browser.find_element(By.ID, "n").send_keys("2")
    browser.find_element(By.ID, "go").click()
    until(lambda: browser.find_element(By.ID, "status").text.startswith("base"), 30, "no images")
    figures = browser.find_elements(By.CSS_SELECTOR, "#images figure")
    assert len(figures) == 2 and all(f.find_elements(By.CSS_SELECTOR, "img.result") for f in figures)
    up, down = figures[0].find_elements(By.CSS_SELECTOR, ".rate button")
    assert [up.get_attribute("aria-label"), down.get_attribute("aria-label")] == ["rate good", "rate bad"]
    said = figures[0].find_element(By.CSS_SELECTOR, ".rated")
    up.click()
    until(lambda: said.text == "rated good - thank you", 10, f"no answer shown (shows {said.text!r})")
    down.click()
    until(lambda: "replaced" in said.text, 10, f"no replacement shown (shows {said.text!r})")
    assert down.get_attribute("aria-pressed") == "true" and up.get_attribute("aria-pressed") == "false"
    assert site.store.summary() == {"base": {"7": {"count": 1, "positive": 0, "mean": -1.0}}}

    # the store refuses (as its rate limit does) with text that looks like markup: shown as text, nothing injected
    original = site.store._limit

    def hostile(tenant, now):
        from serving.feedback import FeedbackError

        raise FeedbackError(429, '<img src=x id=injected onerror="document.title=1"> slow down', None, 30)

    site.store._limit = hostile
    try:
        other = figures[1].find_element(By.CSS_SELECTOR, ".rated")
        figures[1].find_elements(By.CSS_SELECTOR, ".rate button")[0].click()
        until(lambda: other.text.startswith("rating not saved: 429: <img"), 10, f"shows {other.text!r}")
    finally:
        site.store._limit = original
    assert "error" in other.get_attribute("class") and not browser.find_elements(By.ID, "injected")


def test_on_the_stars_scale_each_image_gets_five_stars(site, browser):  # noqa: F811
    from selenium.webdriver.common.by import By

    routes, store = site.api.feedback, site.store
    thumbs = routes.args
    routes.args, store.scale = thumbs.model_copy(update={"scale": "stars"}), "stars"
    try:
        browser.get(site.url + "/")
        browser.find_element(By.ID, "key").send_keys(KEY)
        browser.find_element(By.ID, "go").click()
        until(lambda: browser.find_element(By.ID, "status").text.startswith("base"), 30, "no image")
        [figure] = browser.find_elements(By.CSS_SELECTOR, "#images figure")
        stars = figure.find_elements(By.CSS_SELECTOR, ".rate button")
        assert [b.text for b in stars] == ["1\u2605", "2\u2605", "3\u2605", "4\u2605", "5\u2605"]
        before = store.summary().get("base", {}).get("7", {"count": 0, "positive": 0, "mean": 0.0})
        stars[3].click()
        said = figure.find_element(By.CSS_SELECTOR, ".rated")
        until(lambda: said.text == "rated 4 of 5 - thank you", 10, f"no answer shown (shows {said.text!r})")
        count = before["count"] + 1  # the store's tallies also hold the thumbs test's rating, if it ran first
        mean = (before["mean"] * before["count"] + 4) / count
        assert store.summary()["base"]["7"] == {"count": count, "positive": before["positive"] + 1, "mean": mean}
    finally:
        routes.args, store.scale = thumbs, "thumbs"
