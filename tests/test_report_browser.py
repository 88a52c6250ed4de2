"""Every page of the built ci-profile report, as a reader sees it in headless Chromium.

A green strict build once hid a report whose every prose line was a heading; this test opens
the pages from disk (``file://``, as a supervisor opens the shared archive) and checks what is
on screen. It needs Debian's ``chromium`` and ``chromium-driver`` (``make setup`` installs them
as root); without them it is skipped, with the reason, never passed.
"""

from __future__ import annotations

import re
import shutil
from functools import lru_cache
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

from tamperbench import paths

pytestmark = pytest.mark.slow

#: Console messages that are not problems of the report: the theme logs this one at error level
#: when a fresh browser profile has no stored light/dark preference yet, then uses "auto".
BENIGN_CONSOLE = ("Got invalid theme mode: . Resetting to auto",)
LEFTOVER_MARKUP = ("{glue", "{cite", "{numref", "{doc}", "<Figure size", "<Axes:")
#: The landing page (index.html forwards to intro.html) and a results page
SCREENSHOTS = {"landing": "index", "results_04_detection": "04_detection", "results_05_tampered_datasets": "05_tampered_datasets",
               "results_06_openood": "06_openood", "results_07_adaptive": "07_adaptive",
               "results_08_model_tampering": "08_model_tampering", "literature_adversarial_detection":
               "literature/adversarial_detection", "methods": "09_methods", "discussion": "discussion",
               "reproduce": "90_reproduce"}
#: Chromium's flags for a closed network: no background connections, no first-run, no sandbox
#: (tests run as root), a fresh profile.
CHROMIUM_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                  "--no-first-run", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--allow-file-access-from-files")


def _find(name: str) -> str | None:
    return shutil.which(name) or next((p for p in (f"/usr/bin/{name}",) if Path(p).exists()), None)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    chromium, driver_path = _find("chromium"), _find("chromedriver")
    if not (chromium and driver_path):
        pytest.skip("browser test skipped: Debian's chromium and chromium-driver are not installed "
                    "(make setup installs them when run as root with apt)")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("browser test skipped: selenium is not installed (pip install -e .)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    driver.set_window_size(1280, 1000)
    yield driver
    driver.quit()


@lru_cache(maxsize=None)
def _ids(page: Path) -> frozenset[str]:
    from bs4 import BeautifulSoup

    soup = BeautifulSoup(page.read_text(encoding="utf-8"), "html.parser")
    return frozenset([tag["id"] for tag in soup.find_all(id=True)] + [tag["name"] for tag in soup.find_all("a", attrs={"name": True})])


def _pages(html: Path) -> list[Path]:
    """The report's pages: the top level and the literature review's folder."""
    return sorted([*html.glob("*.html"), *html.glob("literature/*.html")])


def _problems(driver, page: Path, html: Path) -> list[str]:
    """What is wrong with ``page`` as displayed; [] when nothing is."""
    from selenium.webdriver.common.by import By

    source = page.read_text(encoding="utf-8")
    redirect = re.search(r'http-equiv="refresh" content="0; url=([^"]+)"', source, re.IGNORECASE)
    if redirect:  # index.html only forwards to the first page, which is checked on its own
        return [] if (page.parent / redirect.group(1)).exists() else [f"redirect to missing {redirect.group(1)}"]
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(page.as_uri())
    problems = []

    def visible_h1s(d):
        return [h.text for h in d.find_elements(By.TAG_NAME, "h1") if h.is_displayed()]

    # the theme's scripts settle the layout after load; give them a moment before counting
    try:
        WebDriverWait(driver, 5).until(lambda d: d.execute_script("return document.readyState") == "complete"
                                       and len(visible_h1s(d)) == 1)
    except Exception:
        pass
    visible_h1 = visible_h1s(driver)
    if len(visible_h1) != 1:
        problems.append(f"{len(visible_h1)} visible h1 (want exactly 1): {visible_h1[:5]}")
    long_headings = [h.text for h in driver.find_elements(By.CSS_SELECTOR, "main h1, main h2, main h3")
                     if h.is_displayed() and len(h.text) > 100]
    if long_headings:
        problems.append(f"prose rendered as headings: {[t[:60] for t in long_headings[:3]]}")

    broken = driver.execute_script(
        "return Array.from(document.images).filter(i => !i.complete || i.naturalWidth === 0).map(i => i.src)")
    problems += [f"broken image {src}" for src in broken]

    for href in driver.execute_script("return Array.from(document.querySelectorAll('a[href]')).map(a => a.href)"):
        url = urlparse(href)
        if url.scheme != "file":
            continue
        target = Path(unquote(url.path))
        if not target.exists():
            problems.append(f"broken link {href}")
        elif url.fragment and target.suffix == ".html" and unquote(url.fragment) not in _ids(target):
            problems.append(f"broken anchor {href}")

    severe = [e["message"] for e in driver.get_log("browser")
              if e.get("level") == "SEVERE" and not any(b in e["message"] for b in BENIGN_CONSOLE)]
    problems += [f"console error: {m[:200]}" for m in severe]

    text = driver.execute_script(
        "const main = (document.querySelector('main') || document.body).cloneNode(true);"
        "main.querySelectorAll('.cell_input, script, style').forEach(e => e.remove());"
        "return main.textContent;")
    problems += [f"leftover markup {m!r} in the text" for m in LEFTOVER_MARKUP if m in text]
    for css in (".system-message", ".problematic"):
        if driver.find_elements(By.CSS_SELECTOR, css):
            problems.append(f"{css} element on the page (a MyST/Sphinx error rendered into it)")

    shown_code = driver.execute_script(
        "return Array.from(document.querySelectorAll('.cell_input'))"
        ".filter(e => e.checkVisibility() && !e.closest('details:not([open])') && !e.closest('.tag_show-input'))"
        ".map(e => e.textContent.trim().slice(0, 60))")
    problems += [f"visible code input not tagged show-input: {c!r}" for c in shown_code]

    uncaptioned = driver.execute_script(
        "return Array.from(document.querySelectorAll('.cell_output img'))"
        ".filter(i => !(i.closest('figure') && i.closest('figure').querySelector('figcaption')))"
        ".map(i => i.src.split('/').pop())")
    problems += [f"figure without caption: {src}" for src in uncaptioned]
    return problems


def test_every_page_reads_as_a_report(ci_site, browser):
    _, html = ci_site
    pages = _pages(html)
    chapters = {p.stem for p in pages}
    assert {"index", "intro", "01_classifier", "04_detection", "07_adaptive", "08_model_tampering", "09_methods",
            "discussion", "90_reproduce", "references", "xai_cbr", "ood_detection", "adversarial_examples",
            "adversarial_detection", "dataset_shift", "model_tampering"} <= chapters, chapters
    report = {p.name: _problems(browser, p, html) for p in pages}
    bad = {name: probs for name, probs in report.items() if probs}
    assert not bad, "\n".join(f"{name}:\n  " + "\n  ".join(probs[:10]) for name, probs in bad.items())


def test_screenshots_of_the_landing_and_a_results_page(ci_site, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    _, html = ci_site
    out = paths.results_dir("ci") / "screenshots"
    out.mkdir(parents=True, exist_ok=True)
    for name, page in SCREENSHOTS.items():
        browser.get((html / f"{page}.html").as_uri())
        WebDriverWait(browser, 10).until(lambda d: d.find_elements(By.TAG_NAME, "h1"))
        height = browser.execute_script("return document.body.scrollHeight")
        browser.set_window_size(1280, min(max(height, 1000), 6000))
        path = out / f"{name}.png"
        assert browser.save_screenshot(str(path)), path
        assert path.stat().st_size > 10_000  # a real rendering, not a blank page
    browser.set_window_size(1280, 1000)


def test_the_checks_catch_a_broken_page(browser, tmp_path):
    """The checks can fail: a page with the old defects is reported."""
    page = tmp_path / "bad.html"
    page.write_text(
        "<html><body><main><h1>Title</h1><h1>Every prose line rendered as a heading, as in the report's old"
        " notebooks, which is what this check exists to catch</h1><p>{glue:text}`acc`</p>"
        "<img src='missing.png'><a href='nowhere.html'>x</a><a href='#no-such-anchor'>y</a>"
        "<div class='cell'><div class='cell_input'><pre>import torch</pre></div></div>"
        "<span class='problematic'>?</span><script>console.error('a real error')</script></main></body></html>")
    problems = "\n".join(_problems(browser, page, tmp_path))
    for expected in ("2 visible h1", "prose rendered as headings", "broken image", "broken link file:", "nowhere.html",
                     "broken anchor", "#no-such-anchor", "leftover markup '{glue'", ".problematic element",
                     "visible code input not tagged show-input: 'import torch'", "a real error"):
        assert expected in problems, (expected, problems)
