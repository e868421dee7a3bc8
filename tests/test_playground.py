"""The playground page (GET /playground) in a real browser: headless Debian chromium driven by
Selenium, against the session's test server (tests/http_server.py: the tiny base, its heads, API
key). The page is used as a user would: type the key, move a slider with the keyboard, press
Compare, click a token; its numbers are checked against the API's own answer."""

from __future__ import annotations

import json
import math
import os
import shlex
import shutil

import pytest

from http_server import API_KEY, PROMPT

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
try:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait
except ImportError:  # pragma: no cover - the dev extra installs it
    webdriver = None

MISSING = ("needs headless Chromium: `apt-get install -y chromium chromium-driver` (Debian) and "
           "`pip install selenium` (in the dev extra)")
# CI (.ci/run) installs Chromium and sets this: there the browser test must run, never skip.
REQUIRE_ENV = "VAS_REQUIRE_BROWSER"
AVAILABLE = bool(CHROMIUM and DRIVER and webdriver)

WAIT_S = 180
# Flags for a machine without network: without them Chromium waits on connections it cannot make.
CHROMIUM_FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1400,1000"]


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if not AVAILABLE:  # only with REQUIRE_ENV set (else the test is skipped before the server starts)
        pytest.fail(f"{REQUIRE_ENV} is set but the browser is missing: {MISSING}")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    yield driver
    driver.quit()


def _wait(driver, condition):
    return WebDriverWait(driver, WAIT_S).until(condition)


def _error(driver) -> str:
    return _wait(driver, lambda d: d.find_element(By.ID, "error").text)


def _compare(driver) -> None:
    """Press Compare and wait until every answer is in (the button is enabled again)."""
    button = driver.find_element(By.ID, "compare")
    button.click()
    _wait(driver, lambda d: button.is_enabled())


def _text(driver, panel: str) -> str:
    return driver.find_element(By.ID, panel).text


def _shown_request(driver) -> dict:
    """The body of the curl line the page shows for its current settings."""
    words = shlex.split(driver.find_element(By.ID, "curl").text)
    return json.loads(words[words.index("-d") + 1])


@pytest.mark.skipif(not AVAILABLE and not os.environ.get(REQUIRE_ENV), reason=MISSING)
def test_playground_compares_explains_and_shows_errors(browser, server):
    driver = browser
    driver.get(server.url + "/playground")
    # Without the key, the page says so with the server's 401 message.
    assert _error(driver).startswith("401: Invalid or missing API key")
    driver.find_element(By.ID, "api-key").send_keys(API_KEY)
    driver.find_element(By.ID, "load-models").click()
    slider = _wait(driver, lambda d: d.find_element(By.ID, "weight-likes"))
    assert driver.find_element(By.ID, "error").get_attribute("hidden") is not None
    prompt = driver.find_element(By.ID, "prompt")
    prompt.clear()
    prompt.send_keys(PROMPT)
    for field, value in (("max-tokens", "12"), ("top-k", "256")):
        box = driver.find_element(By.ID, field)
        box.clear()
        box.send_keys(value)

    # A positive weight: the slider to its end (10), by keyboard.
    slider.send_keys(Keys.END)
    assert slider.get_attribute("value") == "10"
    _compare(driver)
    plain, steered = _text(driver, "plain-out"), _text(driver, "steered-out")
    assert plain and steered and plain != steered

    # The per-token view against the API's own answer to the request the page shows.
    shown = _shown_request(driver)
    assert shown["vas_weights"] == {"likes": 10} and shown["vas_top_k"] == 256 and shown["seed"] == 1
    response = server.post("/v1/chat/completions", {**shown, "vas_explain": 5})
    assert response.status_code == 200, response.text
    answer = response.json()
    explained = answer["vas_explain"]
    # The record itself: its tokens are the answer, and log(steered_p / base_p) of two candidates
    # differs by their contributions' difference (the rule: l' = l + sum_h w_h c_h).
    assert "".join(t["token"] for t in explained["tokens"]) == answer["choices"][0]["message"]["content"]
    for token in explained["tokens"]:
        lifts = [math.log(c["steered_p"] / c["base_p"]) - c["contributions"]["likes"] for c in token["candidates"]]
        assert max(lifts) - min(lifts) == pytest.approx(0, abs=1e-4)
    spans = driver.find_elements(By.CSS_SELECTOR, "#steered-out .tok")
    assert [s.get_attribute("textContent") for s in spans] == [t["token"] for t in explained["tokens"]]
    assert len(spans) == len(explained["tokens"]) == 12
    assert any("lifted" in s.get_attribute("class") for s in spans)
    for i in (0, len(spans) - 1):
        spans[i].click()
        rows = _wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#candidates tr[data-token-id]"))
        want = explained["tokens"][i]
        shown_rows = {int(r.get_attribute("data-token-id")): r for r in rows}
        for candidate in want["candidates"]:
            row = shown_rows[candidate["token_id"]]
            for cls, key in (("base-p", "base_p"), ("steered-p", "steered_p")):
                cell = row.find_element(By.CLASS_NAME, cls)
                assert float(cell.get_attribute("data-value")) == pytest.approx(candidate[key], rel=1e-9)
                assert cell.text == f"{candidate[key]:.4f}"
            assert float(row.find_element(By.CLASS_NAME, "contribution").get_attribute("data-value")) \
                == pytest.approx(candidate["contributions"]["likes"], rel=1e-9)
        assert "chosen" in shown_rows[want["token_id"]].get_attribute("class")

    # Pin weight 10, then weight 0: the steered answer equals the plain one, the pinned one the old steered one.
    driver.find_element(By.ID, "pin").click()
    for _ in range(20):  # step 0.5: 10 -> 0
        slider.send_keys(Keys.ARROW_LEFT)
    assert slider.get_attribute("value") == "0"
    _compare(driver)
    assert _text(driver, "steered-out") == _text(driver, "plain-out") == plain
    assert _text(driver, "pinned-out") == steered
    driver.find_element(By.ID, "unpin").click()

    # An invalid K and an unknown head (a page older than the server's heads): the server's 400s, shown.
    slider.send_keys(Keys.END)
    top_k = driver.find_element(By.ID, "top-k")
    top_k.clear()
    top_k.send_keys("999")
    _compare(driver)
    assert "400: vas_top_k must be an integer in 1..256, got 999" in _error(driver)
    top_k.clear()
    driver.execute_script("document.getElementById('weight-likes').dataset.head = 'no-such-head'")
    _compare(driver)
    api = server.post("/v1/chat/completions", _shown_request(driver)).json()["error"]["message"]
    assert "unknown head 'no-such-head'" in api and f"400: {api}" in _error(driver)


def test_vas_explain_is_refused_where_it_cannot_be_answered(server, model):
    steered = {"model": model, "vas_weights": {"likes": 2}, "vas_explain": 3}
    for path, body, message in (
            ("/v1/responses", {**steered, "input": "Hi", "max_output_tokens": 2}, "only"),
            ("/v1/completions", {**steered, "prompt": "Hi", "max_tokens": 2, "n": 2}, "n = 1"),
            ("/v1/completions", {**steered, "prompt": "Hi", "max_tokens": 2, "vas_weights": {}}, "non-zero weight")):
        response = server.post(path, body)
        assert response.status_code == 400, response.text
        assert response.json()["error"]["param"] == "vas_explain" and message in response.json()["error"]["message"]
    answer = server.post("/v1/completions", {**steered, "prompt": "Hi", "max_tokens": 3}).json()
    assert len(answer["vas_explain"]["tokens"]) == 3 and answer["vas_explain"]["heads"] == ["likes"]
    assert "vas_explain" not in server.post("/v1/completions", {**steered, "prompt": "Hi", "max_tokens": 3,
                                                                 "vas_explain": None}).json()


def test_playground_files_are_served(server):
    for path, kind in (("/playground", "text/html"), ("/playground/playground.js", "text/javascript"),
                       ("/playground/playground.css", "text/css")):
        response = server.http.get(path)
        assert response.status_code == 200 and response.headers["content-type"].startswith(kind)
    page = server.http.get("/playground").text
    assert "http" not in page.replace("http-equiv", "")  # nothing fetched from elsewhere
    assert f"playground: {server.url}/playground" in server.log.read_text()  # the startup lines link it
