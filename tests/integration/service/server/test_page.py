"""The try-a-model page in a real browser: Debian's Chromium, headless, driven by selenium
through Debian's chromedriver. It uploads a real photo and checks what the page shows
against what classifier.v1 answers for the same photo."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.integration.service.conftest import ServerProcess

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# Where to keep the screenshot (the docs keep one: PAGE_SCREENSHOT=docs/page.png).
SCREENSHOT = os.environ.get("PAGE_SCREENSHOT")


def test_the_page_shows_the_top_k_the_box_and_the_heatmap(
    browser: object, demo_server: ServerProcess, quick_model: dict[str, Path], tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.remote.webdriver import WebDriver
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    driver: WebDriver = browser  # type: ignore[assignment]
    photo = sorted((quick_model["data"] / "val").rglob("*.jpg"))[3]
    with demo_server.client() as client:
        (expected,) = client.localize([photo], model="demo", top_k=3, include_heatmap=True)

    driver.get(f"http://{demo_server.http_target}/")
    wait = WebDriverWait(driver, 30)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#model option"))
    assert "demo" in driver.find_element(By.ID, "model").text
    assert not driver.find_element(By.ID, "answer").is_displayed()  # nothing asked yet
    top_k = driver.find_element(By.ID, "top-k")
    top_k.clear()
    top_k.send_keys("3")
    driver.find_element(By.ID, "file").send_keys(str(photo))
    wait.until(ec.visibility_of_element_located((By.ID, "answer")))

    items = driver.find_elements(By.CSS_SELECTOR, "#results li")
    assert [i.get_attribute("data-label") for i in items] == [p.label for p in expected.predictions]
    assert driver.find_element(By.ID, "top-label").text.startswith(expected.top.label)
    canvas = driver.find_element(By.ID, "canvas")
    drawn = [int(v) for v in str(canvas.get_attribute("data-box")).split(",")]
    box = [round(v) for v in expected.box.as_tuple()]
    assert max(abs(a - b) for a, b in zip(drawn, box, strict=True)) <= 1
    assert canvas.get_attribute("data-heatmap") == "shown"
    assert "regression" in driver.find_element(By.ID, "box-info").text
    screenshot = tmp_path / "page.png"
    driver.save_screenshot(str(screenshot))
    assert screenshot.stat().st_size > 10_000
    if SCREENSHOT:
        shutil.copy(screenshot, SCREENSHOT)

    driver.find_element(By.ID, "heatmap-toggle").click()  # the overlay goes, the box stays
    assert canvas.get_attribute("data-heatmap") == "hidden"
    assert canvas.get_attribute("data-box") == ",".join(map(str, drawn))
    assert "answered by demo version 1" in driver.find_element(By.ID, "status").text


def test_the_page_says_why_when_the_token_is_missing(
    browser: object, start_server: type[ServerProcess], quick_model: dict[str, Path]
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.remote.webdriver import WebDriver
    from selenium.webdriver.support.ui import WebDriverWait

    driver: WebDriver = browser  # type: ignore[assignment]
    server = start_server(quick_model["repository"], "--auth-token", "page-token")
    server.wait_for_event("serving")
    driver.get(f"http://{server.http_target}/")
    status = driver.find_element(By.ID, "status")
    WebDriverWait(driver, 30).until(lambda d: "token" in status.text)
    assert "error" in str(status.get_attribute("class"))
    token = driver.find_element(By.ID, "token")
    token.send_keys("page-token")
    driver.find_element(By.ID, "top-k").click()  # leaves the field: "change" fires
    WebDriverWait(driver, 30).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#model option"))
    driver.execute_script("sessionStorage.clear()")
