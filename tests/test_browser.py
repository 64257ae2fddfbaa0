"""The chat page in headless Chromium: send, watch it stream, thumbs up, compare, and find it all in SQLite.

Skipped unless /usr/bin/chromium and chromedriver are installed. Set GPTLAB_SCREENSHOTS=DIR to keep PNGs.
"""
import os
import shutil
import sqlite3
import tempfile
import time
from pathlib import Path

import pytest

from gptlab.serve.app import create_app
from gptlab.serve.store import Store

CHROMIUM = "/usr/bin/chromium"
DRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not (os.path.exists(CHROMIUM) and os.path.exists(DRIVER)),
                       reason="needs /usr/bin/chromium and chromedriver"),
]


@pytest.fixture
def browser():
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="gptlab-chromium-")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--window-size=1280,860"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    driver.set_page_load_timeout(20)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def shot(driver, name):
    folder = os.environ.get("GPTLAB_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(Path(folder) / f"{name}.png"))


def wait_for(predicate, timeout=10.0):
    """Poll until `predicate` is truthy. The page re-renders rows while it streams, so an element
    found by one call may be replaced before the next; a stale element means "not yet", not failure."""
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException

    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            value = predicate()
        except (StaleElementReferenceException, NoSuchElementException, IndexError):
            value = None
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("timed out waiting for the page")


def test_page_chat_thumbs_compare(browser, tmp_path):
    from test_serve import FILLER, LiveServer, FakeBackend   # the same deterministic backend
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    from gptlab.tokenizer import Tokenizer

    tok = Tokenizer.train(["Hello there! How are you today? The quick brown fox. " * 30], vocab_size=300)
    fake = FakeBackend(tok, delay=0.02)
    db = tmp_path / "chat.sqlite3"
    store = Store(db)
    with LiveServer(create_app(fake, store=store)) as server:
        d = browser
        d.get(server.url + "/")
        wait_for(lambda: "fake-model" in d.find_element(By.ID, "model-info").text)
        shot(d, "01-empty")

        # Send a message; watch the answer grow while it streams.
        d.find_element(By.ID, "temperature").send_keys(Keys.HOME)   # temperature 0: deterministic reply
        box = d.find_element(By.ID, "input")
        box.send_keys("Hello page")
        box.send_keys(Keys.ENTER)
        partial = wait_for(lambda: d.find_elements(By.CSS_SELECTOR, ".row.assistant .msg.streaming")
                           and d.find_element(By.CSS_SELECTOR, ".row.assistant .msg").text.strip())
        assert d.find_element(By.ID, "stop").is_displayed()
        shot(d, "02-streaming")
        full = f"You said: Hello page.{FILLER}"
        wait_for(lambda: d.find_elements(By.CSS_SELECTOR, ".row.assistant[data-id] .thumb-up"))
        answer = d.find_element(By.CSS_SELECTOR, ".row.assistant .msg").text
        assert answer == full and len(partial) < len(full)
        wait_for(lambda: "Hello page" in d.find_element(By.ID, "conversations").text)   # titled by 1st message

        # Thumbs up.
        d.find_element(By.CSS_SELECTOR, ".row.assistant .thumb-up").click()
        wait_for(lambda: "on" in d.find_element(By.CSS_SELECTOR, ".thumb-up").get_attribute("class"))
        shot(d, "03-thumbs")

        # Compare mode: two answers side by side, pick B.
        d.find_element(By.ID, "compare-toggle").click()
        d.find_element(By.ID, "temperature").send_keys(Keys.END)
        box.send_keys("Which is better?")
        box.send_keys(Keys.ENTER)
        wait_for(lambda: d.find_element(By.CSS_SELECTOR, ".side-a .msg").text
                 and d.find_element(By.CSS_SELECTOR, ".side-b .msg").text)
        wait_for(lambda: d.find_element(By.CSS_SELECTOR, ".choose-b").is_enabled())
        shot(d, "04-compare")
        b_text = d.find_element(By.CSS_SELECTOR, ".side-b .msg").text
        d.find_element(By.CSS_SELECTOR, ".choose-b").click()
        wait_for(lambda: not d.find_elements(By.CSS_SELECTOR, ".compare")
                 and d.find_elements(By.CSS_SELECTOR, ".row.assistant[data-id]")[-1].text.startswith(b_text[:20]))
        shot(d, "05-after-choice")

        # Stop button: abort mid-stream; the partial answer is kept (and stored).
        d.find_element(By.ID, "compare-toggle").click()
        fake.delay = 0.05
        box.send_keys("Now stop me")
        box.send_keys(Keys.ENTER)
        wait_for(lambda: len(d.find_elements(By.CSS_SELECTOR, ".row.assistant .msg.streaming")) == 1
                 and d.find_element(By.CSS_SELECTOR, ".msg.streaming").text.strip())
        d.find_element(By.ID, "stop").click()
        wait_for(lambda: "(stopped)" in d.find_elements(By.CSS_SELECTOR, ".row.assistant")[-1].text)
        assert d.find_element(By.ID, "send").is_displayed()
        shot(d, "06-stopped")

    store.close()
    raw = sqlite3.connect(db)
    assert raw.execute("SELECT rating FROM feedback").fetchall() == [(1,)]
    assert raw.execute("SELECT choice FROM comparisons").fetchall() == [("b",)]
    roles = raw.execute("SELECT role, finish_reason FROM messages ORDER BY id").fetchall()
    assert roles[-1] == ("assistant", "stopped") and len(roles) == 6
