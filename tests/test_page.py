"""The page at / in a real headless Chromium against the real service (uvicorn, seeded ONNX model): real photos
uploaded, answers read, feedback sent with the button, no console errors, screenshots at desktop and phone sizes.

PAGE_SCREENSHOTS=docs/img also writes the screenshots there (`make screenshots`)."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import httpx2 as httpx
import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

from tests.browser import chromium, set_viewport
from tests.conftest import DATASET
from tests.service import Service

CAT, DOG, NOT_AN_IMAGE = DATASET / "cats/cat.1.jpg", DATASET / "dogs/dog.2.jpg", DATASET / "cats/cat.90003.jpg"


@pytest.fixture(scope="module")
def service(onnx_model: Path, tmp_path_factory: pytest.TempPathFactory):
    log = tmp_path_factory.mktemp("page") / "predictions.jsonl"
    running = Service(onnx_model, PREDICTION_LOG=str(log))
    running.wait_ready()
    running.prediction_log = log
    yield running
    running.stop()


@pytest.fixture
def browser(tmp_path: Path):
    driver = chromium(tmp_path / "profile")
    yield driver
    driver.quit()


def wait_for(driver, css: str, count: int = 1, timeout: float = 30) -> list:
    def found(d):
        elements = d.find_elements(By.CSS_SELECTOR, css)
        return elements if len(elements) >= count else False

    return WebDriverWait(driver, timeout).until(found)


def console_errors(driver) -> list[dict]:
    return [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


def screenshot(driver, name: str, tmp_path: Path) -> Path:
    path = tmp_path / name
    assert driver.save_screenshot(str(path))
    assert path.stat().st_size > 10_000 and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if os.environ.get("PAGE_SCREENSHOTS"):
        target = Path(os.environ["PAGE_SCREENSHOTS"])
        target.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target / name)
    return path


def upload(driver, *files: Path) -> None:
    driver.find_element(By.ID, "file").send_keys("\n".join(str(f) for f in files))


def feedback_counts(service: Service) -> dict[str, float]:
    lines = httpx.get(f"{service.url}/metrics").text.splitlines()
    return {
        line.split(" ")[0]: float(line.split(" ")[1]) for line in lines if line.startswith("catsdogs_feedback_total")
    }


def test_page_headers_forbid_inline_code_and_framing(service):
    response = httpx.get(f"{service.url}/")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    policy = response.headers["content-security-policy"]
    assert "default-src 'self'" in policy and "frame-ancestors 'none'" in policy and "unsafe-inline" not in policy
    assert response.headers["x-content-type-options"] == "nosniff"
    assert "<script>" not in response.text and "style=" not in response.text and "http" not in response.text.lower()
    script = httpx.get(f"{service.url}/static/page.js")
    assert script.status_code == 200 and script.headers["x-content-type-options"] == "nosniff"
    assert httpx.get(f"{service.url}/static/../app.py").status_code == 404


def test_batch_of_photos_answers_feedback_and_desktop_screenshot(service, browser, tmp_path):
    set_viewport(browser, 1280, 800)
    browser.get(f"{service.url}/")
    WebDriverWait(browser, 30).until(lambda d: "ok" in d.find_element(By.ID, "service").get_attribute("class"))
    assert "seeded-imagenet-head" in browser.find_element(By.ID, "service").text

    upload(browser, CAT, DOG, NOT_AN_IMAGE)
    labels = wait_for(browser, "[data-testid=label]", count=2)
    assert [label.get_attribute("data-label") for label in labels] == ["cat", "dog"]
    assert all(label.text.endswith("%") for label in labels)
    [error] = wait_for(browser, "[data-testid=error]")
    assert error.get_attribute("data-code") == "invalid_image"
    assert error.text == "This file is not an image the service can read."
    cards = browser.find_elements(By.CSS_SELECTOR, ".card")
    assert len(cards) == 3
    assert len(cards[0].find_elements(By.CSS_SELECTOR, ".bar")) == 2
    assert "seeded-imagenet-head" in cards[0].find_element(By.CSS_SELECTOR, ".meta").text
    previews = browser.execute_script("return [...document.querySelectorAll('.thumb')].map(i => i.naturalWidth)")
    assert all(width > 0 for width in previews[:2]), previews
    assert "cat.1.jpg: cat" in browser.find_element(By.ID, "summary").text  # what the screen reader announces

    before = feedback_counts(service)
    cards[0].find_element(By.CSS_SELECTOR, "[data-testid=wrong]").click()
    WebDriverWait(browser, 10).until(
        lambda d: "recorded as dog" in cards[0].find_element(By.CSS_SELECTOR, ".thanks").text
    )
    after = feedback_counts(service)
    key = 'catsdogs_feedback_total{correct="false",label="dog",source="anonymous"}'
    assert after[key] == before.get(key, 0) + 1

    events = [json.loads(line) for line in service.prediction_log.read_text().splitlines()]
    [feedback] = [event for event in events if event["event"] == "feedback"]
    [prediction] = [event for event in events if event["prediction_id"] == feedback["prediction_id"]
                    and event["event"] == "prediction"]  # fmt: skip
    assert prediction["label"] == "cat" and feedback["label"] == "dog"

    screenshot(browser, "page-desktop.png", tmp_path)
    assert console_errors(browser) == []


def test_phone_viewport_single_photo_and_keyboard(service, browser, tmp_path):
    set_viewport(browser, 390, 844, mobile=True)
    browser.get(f"{service.url}/")
    WebDriverWait(browser, 30).until(lambda d: "ok" in d.find_element(By.ID, "service").get_attribute("class"))
    browser.find_element(By.TAG_NAME, "body").send_keys(Keys.TAB)
    assert browser.switch_to.active_element.get_attribute("id") == "file"  # the first stop is the photo picker
    label = browser.find_element(By.CSS_SELECTOR, "label[for=file]").text
    assert "Choose photos" in label

    upload(browser, DOG)
    [answer] = wait_for(browser, "[data-testid=label]")
    assert answer.get_attribute("data-label") == "dog"
    right = browser.find_element(By.CSS_SELECTOR, ".feedback button.right")
    right.click()
    WebDriverWait(browser, 10).until(lambda d: "recorded as dog" in d.find_element(By.CSS_SELECTOR, ".thanks").text)
    assert browser.execute_script("return document.documentElement.scrollWidth") <= 390  # no sideways scrolling
    screenshot(browser, "page-phone.png", tmp_path)
    assert console_errors(browser) == []


def wait_healthy(service: Service, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{service.url}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.05)
    raise TimeoutError("\n".join(service.lines))


def test_page_explains_a_service_without_a_model(tmp_path, browser):
    empty = Service(tmp_path / "missing.onnx")
    try:
        wait_healthy(empty)
        browser.get(f"{empty.url}/")
        WebDriverWait(browser, 30).until(lambda d: "down" in d.find_element(By.ID, "service").get_attribute("class"))
        assert "not ready" in browser.find_element(By.ID, "service").text
        upload(browser, CAT)
        [error] = wait_for(browser, "[data-testid=error]")
        assert error.get_attribute("data-code") == "model_not_loaded"
        assert "no model is loaded" in error.text
    finally:
        empty.stop()
