"""`serve run configs/serve.yaml` as a user runs it: the champion toy adapter from a real MLflow registry, reached
with curl, the SDK, the OpenAI client and the web page in headless Chromium; stopped by PID, nothing left behind."""

from __future__ import annotations

import base64
import io
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest
import yaml
from PIL import Image

from tests.serving.test_app import free_port

pytestmark = pytest.mark.slow
PROMPT = "a red circle on a sks background"


@pytest.fixture(scope="module")
def served(repo, toy_good_adapter, mlflow_server, tmp_path_factory):
    """configs/serve.yaml with a free port and the test's tracking server, started with `serve run`."""
    from tests.serving.conftest import register_adapter

    version = register_adapter(mlflow_server, "toy-sks-lora", toy_good_adapter)
    tmp = tmp_path_factory.mktemp("serve-run")
    config = yaml.safe_load((repo / "configs" / "serve.yaml").read_text())
    port = free_port()
    config["http_options"]["port"] = port
    args = config["applications"][0]["args"]
    args.update(tracking_uri=mlflow_server, adapter_cache_dir=str(tmp / "cache"), api_key_env="LORAFLEET_UNSET")
    (tmp / "serve.yaml").write_text(yaml.safe_dump(config))
    env = os.environ | {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "HF_HUB_OFFLINE": "1"}
    serve_bin = Path(sys.executable).with_name("serve")
    log = open(tmp / "serve.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [str(serve_bin), "run", str(tmp / "serve.yaml")], cwd=repo, env=env, stdout=log, stderr=subprocess.STDOUT
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            try:
                if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(2)
        else:
            pytest.fail(f"serve run did not become ready:\n{(tmp / 'serve.log').read_text()[-3000:]}")
        yield {"url": url, "version": version, "pid": proc.pid}
    finally:
        family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        proc.send_signal(signal.SIGINT)  # serve run shuts Serve and its local Ray down on Ctrl-C
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()

        # Ray's own processes (raylet, GCS, workers) exit after `serve run` does: on a busy machine that takes a
        # while, so wait on the condition (every one gone or a zombie) with a generous limit, not a fixed sleep
        def running() -> list[psutil.Process]:
            out = []
            for p in family:
                try:
                    if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                        out.append(p)
                except psutil.NoSuchProcess:
                    pass
            return out

        deadline = time.time() + 90
        while running() and time.time() < deadline:
            time.sleep(0.5)
        left = []
        for p in running():
            try:
                left.append(f"{p.pid} {' '.join(p.cmdline())[:120]}")
                p.kill()
            except psutil.NoSuchProcess:
                pass
        assert not left, f"processes left behind by serve run 90 s after it exited: {left}"


def test_curl_gets_a_png_from_the_champion(served):
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    out = subprocess.run(
        ["curl", "-sf", "-D", "-", "-o", "-", f"{served['url']}/v1/generate?prompt=a+red+circle+on+a+sks+background"],
        capture_output=True,
        check=True,
        timeout=60,
    ).stdout
    head, _, body = out.partition(b"\r\n\r\n")
    assert b"x-model: champion" in head.lower() and f"x-version: {served['version']}".encode() in head.lower()
    assert Image.open(io.BytesIO(body)).size == (64, 64)


def test_the_sdk_gets_images_from_the_champion(served):
    from serving.client import Client

    with Client(served["url"]) as client:
        assert client.health() == {"live": True, "ready": True}
        images = client.generate(PROMPT, n=2, seed=0)
        assert [im.info["version"] for im in images] == [served["version"]] * 2
        assert [im.info["seed"] for im in images] == [0, 1]
        ids = [m["id"] for m in client.models()]
        assert ids[:2] == ["base", "champion"] and f"toy-sks-lora/{served['version']}" in ids


def test_an_openai_client_gets_images(served):
    from openai import OpenAI

    client = OpenAI(base_url=f"{served['url']}/v1", api_key="not-needed", max_retries=0)
    result = client.images.generate(model="champion", prompt=PROMPT, n=1, size="64x64", response_format="b64_json")
    assert Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json))).size == (64, 64)
    assert [m.id for m in client.models.list()][:2] == ["base", "champion"]


def test_the_web_page_draws_an_image_in_headless_chromium(served, tmp_path):
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        if os.environ.get("LORAFLEET_REQUIRE_BROWSER") == "1":
            pytest.fail("chromium/chromedriver missing: apt-get install chromium chromium-driver")
        pytest.skip("needs Debian's chromium and chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import Select, WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
    ):
        options.add_argument(flag)
    browser = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver))
    try:
        browser.get(served["url"] + "/")
        wait = WebDriverWait(browser, 60)
        wait.until(lambda b: len(Select(b.find_element(By.ID, "model")).options) > 2)  # filled from /v1/models
        Select(browser.find_element(By.ID, "model")).select_by_value("champion")
        prompt = browser.find_element(By.ID, "prompt")
        prompt.clear()
        prompt.send_keys("a blue square on a sks background")
        browser.find_element(By.ID, "go").click()
        image = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#images img.result")))
        wait.until(lambda b: b.execute_script("return arguments[0].complete && arguments[0].naturalWidth", image))
        assert browser.execute_script("return arguments[0].naturalWidth", image) == 64
        assert f"champion v{served['version']}" in browser.find_element(By.ID, "status").text
        browser.save_screenshot(str(tmp_path / "page.png"))
    finally:
        browser.quit()
