"""The web page llava-serve shows at /, in a real headless Chromium (selenium) over the toy model.

The page must give the very answer `Pipeline.generate` gives alone (it asks greedily), stream
it in delta by delta, send the whole conversation on the next question (the image in the
first user turn only), and show the server's error messages. Skipped where Chromium or
chromedriver is not installed (Debian: `apt-get install chromium chromium-driver`).

LLAVA_SCREENSHOT=1 saves the page after its first answer to docs/serve-page.png.
"""

from __future__ import annotations

import base64
import os
import shutil
from pathlib import Path

import pytest

from tests.support.serving import live_server

SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "serve-page.png"
WAIT_S = 30


def browser_paths() -> tuple[str, str]:
    """(chromium, chromedriver), or a skip saying what is missing."""
    chromium = next(
        (
            found
            for name in ("/usr/bin/chromium", "chromium", "chromium-browser", "google-chrome")
            if (found := shutil.which(name))
        ),
        None,
    )
    driver = shutil.which("/usr/bin/chromedriver") or shutil.which("chromedriver")
    missing = [name for name, path in (("chromium", chromium), ("chromedriver", driver)) if path is None]
    if missing:
        pytest.skip(f"{' and '.join(missing)} not installed (apt-get install chromium chromium-driver)")
    return chromium, driver


@pytest.fixture(scope="module")
def browser():
    pytest.importorskip("selenium", reason="selenium is not installed")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, driver_path = browser_paths()
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=960,900"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        yield driver
    finally:
        driver.quit()  # chromedriver and every chromium process with it


@pytest.fixture(scope="module")
def scene():
    """One held-out toy image and three of its questions: a long answer, then follow-ups."""
    from exporter.toy.evaluate import held_out_questions

    items = held_out_questions(1)
    return items[0].image, [item.question for item in items[:3]]


# -- reading and driving the page ------------------------------------------------------------

RECORD_REQUESTS = """
window.sentBodies = [];
window.answerUpdates = 0;
const fetchBefore = window.fetch;
window.fetch = (url, init) => {
  if (String(url).endsWith('/v1/chat/completions')) window.sentBodies.push(JSON.parse(init.body));
  return fetchBefore(url, init);
};
new MutationObserver((records) => {
  for (const r of records) if (r.target.classList && r.target.classList.contains('assistant')) window.answerUpdates++;
}).observe(document.getElementById('conversation'), {childList: true, subtree: true});
"""


def by_id(driver, ident: str):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, ident)


def wait(driver, condition, message: str):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, WAIT_S, poll_frequency=0.05).until(lambda d: condition(), message)


def turns(driver, role: str) -> list[str]:
    script = f"return [...document.querySelectorAll('#conversation .turn.{role}')].map(e => e.textContent)"
    return driver.execute_script(script)


def idle(driver) -> bool:
    return by_id(driver, "conversation").get_attribute("aria-busy") == "false"


def open_page(driver, server) -> None:
    driver.get(server.url + "/")
    wait(driver, lambda: by_id(driver, "model-name").text not in ("", "…"), "the page did not read the model")
    driver.execute_script(RECORD_REQUESTS)


def choose_image(driver, path: Path) -> None:
    by_id(driver, "image-input").send_keys(str(path))
    wait(driver, lambda: by_id(driver, "thumbnail").is_displayed(), "no thumbnail for the chosen image")


def ask(driver, question: str, *, enter: bool = False) -> None:
    from selenium.webdriver.common.keys import Keys

    by_id(driver, "question").send_keys(question + (Keys.ENTER if enter else ""))
    if not enter:
        by_id(driver, "ask").click()


def answer(driver, count: int) -> str:
    """The count-th assistant turn's text, once the page has finished streaming it."""
    wait(driver, lambda: len(turns(driver, "assistant")) == count and idle(driver), f"no answer {count}")
    return turns(driver, "assistant")[count - 1]


def save_png(image, tmp_path: Path) -> Path:
    path = tmp_path / "scene.png"
    image.save(path, "PNG")
    return path


# -- tests -----------------------------------------------------------------------------------


def test_page_streams_the_answer_and_keeps_the_conversation(browser, toy_pipe, scene, tmp_path):
    import openai

    image, (first, second, third) = scene
    path = save_png(image, tmp_path)
    with live_server(toy_pipe) as server:
        open_page(browser, server)
        assert by_id(browser, "model-name").text == server.model
        assert by_id(browser, "temperature").get_attribute("value") == "0"
        max_tokens = int(by_id(browser, "max-tokens").get_attribute("value"))

        choose_image(browser, path)
        ask(browser, first)
        expected = toy_pipe.generate(first, [image], max_new_tokens=max_tokens).text
        assert expected
        assert answer(browser, 1) == expected
        assert turns(browser, "user") == [first]
        assert browser.execute_script("return window.answerUpdates") > 1  # rendered delta by delta
        assert by_id(browser, "error").text == ""
        if os.environ.get("LLAVA_SCREENSHOT") == "1":
            browser.save_screenshot(str(SCREENSHOT))

        ask(browser, second, enter=True)  # Enter asks too
        follow_up = answer(browser, 2)
        assert follow_up
        sent = browser.execute_script("return window.sentBodies")
        assert len(sent) == 2
        url = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
        image_turn = {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": first}],
        }
        assert sent[0]["messages"] == [image_turn]
        assert sent[1]["messages"] == [
            image_turn,
            {"role": "assistant", "content": expected},
            {"role": "user", "content": second},
        ]
        for body in sent:
            assert body["stream"] is True and body["temperature"] == 0 and body["max_tokens"] == max_tokens
            assert body["model"] == server.model
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
        reply = client.chat.completions.create(
            model=server.model, messages=sent[1]["messages"], temperature=0, max_tokens=max_tokens
        )
        assert follow_up == reply.choices[0].message.content

        # a second image in the conversation: the server's 400 is shown, the turn taken back
        choose_image(browser, path)
        ask(browser, third)
        wait(browser, lambda: by_id(browser, "error").text != "", "no error shown")
        assert "at most 1" in by_id(browser, "error").text
        assert turns(browser, "user") == [first, second] and len(turns(browser, "assistant")) == 2
        assert by_id(browser, "question").get_attribute("value") == third
        assert by_id(browser, "thumbnail").is_displayed()

        by_id(browser, "new-conversation").click()
        assert turns(browser, "user") == [] and turns(browser, "assistant") == []
        assert by_id(browser, "error").text == "" and by_id(browser, "question").get_attribute("value") == ""
        assert not by_id(browser, "thumbnail").is_displayed()

        ask(browser, first)  # no image now: a new conversation, text only
        answer(browser, 1)
        sent = browser.execute_script("return window.sentBodies")
        assert sent[-1]["messages"] == [{"role": "user", "content": first}]


def test_page_shows_the_api_key_error_and_keeps_the_key(browser, toy_pipe, scene, tmp_path):
    from selenium.webdriver.common.keys import Keys

    image, (question, *_) = scene
    path = save_png(image, tmp_path)
    with live_server(toy_pipe, api_key="sesame") as server:
        browser.get(server.url + "/")
        wait(browser, lambda: "API key" in by_id(browser, "error").text, "no API key error at load")
        assert by_id(browser, "model-name").text == "unknown"

        choose_image(browser, path)
        ask(browser, question)
        wait(browser, lambda: "API key" in by_id(browser, "error").text, "no API key error on asking")
        assert turns(browser, "user") == [] and turns(browser, "assistant") == []

        by_id(browser, "api-key").send_keys("sesame" + Keys.TAB)  # change: stored, models read again
        wait(browser, lambda: by_id(browser, "model-name").text == server.model, "the key did not help")
        assert by_id(browser, "error").text == ""
        by_id(browser, "ask").click()  # the question and the image are still there
        max_tokens = int(by_id(browser, "max-tokens").get_attribute("value"))
        assert answer(browser, 1) == toy_pipe.generate(question, [image], max_new_tokens=max_tokens).text

        browser.refresh()
        wait(browser, lambda: by_id(browser, "model-name").text == server.model, "the key was not kept")
        assert by_id(browser, "api-key").get_attribute("value") == "sesame"
