"""The web playground of `slm serve` (src/slmkit/serve/playground.html) in a real headless Chromium.

A tiny character model is trained once, `slm serve` runs as a subprocess on a free port, and
Selenium drives the page: the model picker, streamed token spans with their probabilities and
tooltip, the request the controls make, stop strings, the API key, the Stop button (which must stop
the server's generation too) and a server error shown in the page. A tiny byte-level BPE model
checks that tokens splitting a character get the right text. Skipped without Chromium and
chromedriver (apt-get install chromium chromium-driver).
"""

from __future__ import annotations

import codecs
import json
import math
import os
import re
import shutil
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import tiny_config
from serve_helpers import ServerProcess, serve

pytest.importorskip("fastapi", reason="slm serve needs the serve extra: pip install -e '.[serve]'")
pytest.importorskip("uvicorn", reason="slm serve needs the serve extra: pip install -e '.[serve]'")
pytest.importorskip("selenium", reason="the playground test needs selenium: pip install selenium")

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.options import Options  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

NO_CHROMIUM = "no Chromium: apt-get install chromium chromium-driver"
TOKENS = "#output span.tok"


def _which(*names: str) -> str | None:
    for name in names:
        found = shutil.which(name) or (f"/usr/bin/{name}" if os.path.exists(f"/usr/bin/{name}") else None)
        if found:
            return found
    return None


# ---------------------------------------------------------------------------------- fixtures


def _train(folder: Path, text: str, iters: int, **data) -> Path:
    import slmkit

    corpus = folder / "corpus.txt"
    corpus.write_text(text, encoding="utf-8")
    cfg = tiny_config(corpus, max_iters=iters, eval_interval=iters, sample_tokens=0, final_eval=False)
    for key, value in data.items():
        setattr(cfg.data, key, value)
    run = folder / "tinyrun"
    slmkit.train(cfg, run, overwrite=True, progress=False)
    return run


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A tiny character model (block 32), allowed long generations."""
    lines = [f"the {['cat', 'dog', 'bird', 'fox'][i % 4]} sat on the {['mat', 'log', 'hat'][i % 3]} number {i % 7}."
             for i in range(400)]
    run = _train(tmp_path_factory.mktemp("playground"), "\n".join(lines) + "\n", 40)
    with serve(run, args=("--max-tokens-limit", "100000"), log_dir=run.parent) as served:
        yield served


@pytest.fixture(scope="module")
def bpe_server(tmp_path_factory):
    """A tiny byte-level BPE model on text with multi-byte characters: its tokens split characters."""
    words = ["café", "naïve", "wörld", "—", "☃", "日本語", "Ωmega", "😀", "the", "cat"]
    text = "\n".join(" ".join(words[(i * j) % len(words)] for j in range(8)) for i in range(300))
    run = _train(tmp_path_factory.mktemp("playground-bpe"), text, 20, tokenizer="bpe", bpe_vocab_size=280)
    with serve(run, log_dir=run.parent) as served:
        yield served


@pytest.fixture(scope="module")
def browser():
    chromium, driver_path = _which("chromium", "chromium-browser"), _which("chromedriver")
    if chromium is None or driver_path is None:
        pytest.skip(NO_CHROMIUM)
    options = Options()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1280,900", "--disable-extensions"):
        options.add_argument(flag)
    # An explicit driver path: selenium must not look for (download) one; there may be no internet.
    driver = webdriver.Chrome(options=options, service=Service(executable_path=driver_path))
    driver.set_script_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def _open(browser, served: ServerProcess):
    """The playground, freshly loaded, with its model list in."""
    browser.get(served.base + "/")
    _until(browser, lambda d: d.execute_script(
        "const m = document.getElementById('model'); return !m.disabled && m.options.length > 0;"),
        "the model picker never filled")
    return browser


@pytest.fixture
def page(browser, server):
    return _open(browser, server)


# ---------------------------------------------------------------------------------- helpers


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def _until(driver, condition, message: str, timeout: float = 20):
    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(condition, message)


def _set(driver, element_id: str, value) -> None:
    """Set a control's value the way typing would (an input event, so readouts and sliders follow)."""
    driver.execute_script(
        "const e = document.getElementById(arguments[0]); e.value = arguments[1];"
        "e.dispatchEvent(new Event('input', {bubbles: true})); e.dispatchEvent(new Event('change', {bubbles: true}));",
        element_id, str(value))


def _prompt(driver, text: str) -> None:
    box = driver.find_element(By.ID, "prompt")
    box.clear()
    box.send_keys(text)


def _status(driver) -> str:
    return driver.find_element(By.ID, "status").text


def _token_spans(driver) -> list[dict]:
    return driver.execute_script(
        "return [...document.querySelectorAll(arguments[0])].map(s => ({text: s.textContent, "
        "prob: s.dataset.prob, logprob: s.dataset.logprob}));", TOKENS)


def _generated(driver) -> str:
    """The output without the echoed prompt."""
    return driver.execute_script(
        "const o = document.getElementById('output'); const p = o.querySelector('.prompt');"
        "return o.textContent.slice(p ? p.textContent.length : 0);")


def _in_flight(base: str) -> int:
    return sum(m["running"] + m["waiting"] for m in _get(base + "/health")["models"].values())


def _finished(driver) -> str:
    _until(driver, lambda d: _status(d).startswith(("finished", "stopped", "error")), "the generation never ended")
    return _status(driver)


# ---------------------------------------------------------------------------------- tests


def test_the_page_loads_and_the_model_picker_lists_the_model(page, server):
    assert page.title == "slmkit playground"
    options = page.execute_script("return [...document.getElementById('model').options].map(o => [o.value, o.text]);")
    assert [value for value, _ in options] == [server.name]
    label = options[0][1]
    assert "parameters" in label and "context 32" in label, label
    for control in ("prompt", "temperature", "top-p", "top-k", "max-tokens", "stop-strings", "api-key"):
        labels = page.find_elements(By.CSS_SELECTOR, f"label[for='{control}']")
        assert labels and labels[0].text.strip(), f"#{control} has no label"
    # the readouts show the defaults
    readouts = {i: page.find_element(By.ID, f"{i}-value").get_attribute("value")
                for i in ("temperature", "top-p", "top-k", "max-tokens")}
    assert readouts == {"temperature": "0.8", "top-p": "1", "top-k": "0", "max-tokens": "200"}
    assert page.find_element(By.ID, "generate").is_enabled()
    assert not page.find_element(By.ID, "stop").is_enabled()
    assert _status(page) == "ready"


def test_generate_streams_token_spans_equal_to_the_servers_text(page, server):
    _prompt(page, "the cat sat")
    _set(page, "temperature", 0)
    _set(page, "max-tokens", 30)
    page.find_element(By.ID, "generate").click()
    status = _finished(page)
    assert re.match(r"finished: finish_reason length, 30 tokens, [\d.]+ tokens/s$", status), status
    spans = _token_spans(page)
    assert len(spans) == 30 and all(s["text"] for s in spans), spans
    # exactly the API's own (greedy) answer, one character token per span, after the echoed prompt
    want = _post(server.base + "/v1/completions",
                 {"prompt": "the cat sat", "max_tokens": 30, "temperature": 0})["choices"][0]["text"]
    assert "".join(s["text"] for s in spans) == want == _generated(page)
    assert page.find_element(By.CSS_SELECTOR, "#output .prompt").text == "the cat sat"
    assert page.find_element(By.ID, "generate").is_enabled() and not page.find_element(By.ID, "stop").is_enabled()
    assert not page.find_element(By.ID, "error").is_displayed()


def test_token_spans_are_shaded_by_probability_with_a_tooltip(page, server):
    _prompt(page, "the dog")
    _set(page, "max-tokens", 10)
    _set(page, "seed", 1)
    page.find_element(By.ID, "generate").click()
    assert _finished(page).startswith("finished"), _status(page)
    spans = _token_spans(page)
    assert len(spans) == 10
    for s in spans:
        p, lp = float(s["prob"]), float(s["logprob"])
        assert 0 < p <= 1 and math.isclose(p, math.exp(lp), rel_tol=1e-3, abs_tol=1e-4), s
    backgrounds = page.execute_script(
        "return [...document.querySelectorAll(arguments[0])].map(s => getComputedStyle(s).backgroundColor);", TOKENS)
    assert all(b not in ("", "transparent", "rgba(0, 0, 0, 0)") for b in backgrounds), backgrounds

    tip = page.find_element(By.ID, "tooltip")
    assert not tip.is_displayed()
    i = next(i for i, s in enumerate(spans) if s["text"].strip() and float(s["prob"]) >= 0.001)
    ActionChains(page).move_to_element(page.find_elements(By.CSS_SELECTOR, TOKENS)[i]).perform()
    _until(page, lambda d: tip.is_displayed(), "hovering a token shows no tooltip", timeout=5)
    text = tip.text
    p = float(spans[i]["prob"])  # to 6 digits: allow for its rounding
    shown = {f"{100 * q:.1f}%" if q >= 0.995 else f"{100 * q:.2f}%" for q in (p * (1 - 1e-5), p, p * (1 + 1e-5))}
    assert "p = " in text and any(f"p = {x}" in text for x in shown), (text, shown)
    assert len(tip.find_elements(By.CSS_SELECTOR, "tr")) >= 2, text  # the top alternatives (5 asked for)
    ActionChains(page).move_to_element(page.find_element(By.ID, "prompt")).perform()
    _until(page, lambda d: not tip.is_displayed(), "the tooltip stays after the pointer left", timeout=5)


def test_the_controls_make_the_request(page, server):
    """What the page sends: each control's value, stop strings parsed, the API key as a bearer token."""
    page.execute_script("""
        window.__sent = [];
        const real = window.fetch;
        window.fetch = (url, init) => {
          if (init && init.body)
            window.__sent.push({url: String(url), headers: init.headers, body: JSON.parse(init.body)});
          return real(url, init);
        };""")
    _prompt(page, "the cat")
    for control, value in (("temperature", 0.5), ("top-p", 0.9), ("top-k", 40), ("max-tokens", 5), ("seed", 7),
                           ("stop-strings", "QQQ, \\n\n a\\,b ,\n\\t"), ("api-key", "sesame")):
        _set(page, control, value)
    assert page.find_element(By.ID, "top-k-value").get_attribute("value") == "40"  # the readouts follow
    page.find_element(By.ID, "generate").click()
    assert _finished(page).startswith("finished: finish_reason length, 5 tokens"), _status(page)
    (sent,) = page.execute_script("return window.__sent;")
    assert sent["url"].endswith("v1/completions")
    body = sent["body"]
    assert body.pop("logprobs") >= 1
    assert body == {"prompt": "the cat", "max_tokens": 5, "temperature": 0.5, "top_p": 0.9, "top_k": 40,
                    "stream": True, "model": server.name, "seed": 7, "stop": ["QQQ", "\n", "a,b", "\t"]}
    assert sent["headers"]["Authorization"] == "Bearer sesame"
    assert page.execute_script("return sessionStorage.getItem('slmkit-playground-api-key');") == "sesame"
    page.execute_script("sessionStorage.clear();")


def test_a_server_with_an_api_key_asks_for_it_and_takes_it(browser, server):
    with serve(server.run, args=("--api-key", "sesame"), log_dir=server.run.parent) as locked:
        browser.get(locked.base + "/")
        browser.execute_script("sessionStorage.clear();")
        browser.refresh()
        error = browser.find_element(By.ID, "error")
        _until(browser, lambda d: error.is_displayed(), "a 401 from /v1/models is not shown", timeout=10)
        assert "401" in error.text and "API key" in error.text, error.text
        assert not browser.find_element(By.ID, "generate").is_enabled()
        browser.find_element(By.ID, "api-key").send_keys("sesame")
        _until(browser, lambda d: d.find_element(By.ID, "generate").is_enabled(), "the key did not unlock the page")
        assert not error.is_displayed()
        _prompt(browser, "the cat")
        _set(browser, "max-tokens", 4)
        browser.find_element(By.ID, "generate").click()
        assert _finished(browser).startswith("finished: finish_reason length, 4 tokens"), _status(browser)
        browser.execute_script("sessionStorage.clear();")


def test_stop_strings_cut_the_text_and_understand_backslash_n(page, server):
    prompt = "the fox sat on the hat number 2."
    full = _post(server.base + "/v1/completions",
                 {"prompt": prompt, "max_tokens": 30, "temperature": 0})["choices"][0]["text"]
    if "\n" in full[1:]:
        stop, typed = "\n", r"QQQ, \n"  # QQQ never occurs: two stops, the second an escaped newline
    else:
        stop = full[3:5]
        typed = f"QQQ\n{stop}"
    want = full[: full.index(stop)]
    _prompt(page, prompt)
    _set(page, "temperature", 0)
    _set(page, "max-tokens", 30)
    _set(page, "stop-strings", typed)
    page.find_element(By.ID, "generate").click()
    status = _finished(page)
    assert status.startswith("finished: finish_reason stop"), status
    assert _generated(page) == want, (full, stop)


def test_stop_button_ends_a_long_generation_on_the_server_too(page, server):
    base = server.base
    _prompt(page, "the bird")
    _set(page, "max-tokens-value", 100000)  # past the slider's end: the box is what is sent
    page.find_element(By.ID, "generate").click()
    try:
        stop = page.find_element(By.ID, "stop")
        _until(page, lambda d: stop.is_enabled(), "Stop never became enabled", timeout=5)
        _until(page, lambda d: len(d.find_elements(By.CSS_SELECTOR, TOKENS)) >= 40, "no streamed tokens")
        assert _status(page).startswith("generating"), _status(page)
        assert _in_flight(base) == 1
        stop.click()
        _until(page, lambda d: _status(d).startswith("stopped"), "the status never said stopped", timeout=5)
        assert re.match(r"stopped after \d+ tokens, [\d.]+ tokens/s$", _status(page)), _status(page)
        count = len(page.find_elements(By.CSS_SELECTOR, TOKENS))
        assert count < 100000
        deadline = time.monotonic() + 5
        while _in_flight(base) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _in_flight(base) == 0, _get(base + "/health")
        time.sleep(0.5)
        assert len(page.find_elements(By.CSS_SELECTOR, TOKENS)) == count  # the text stopped growing
        assert not stop.is_enabled() and page.find_element(By.ID, "generate").is_enabled()
        assert not page.find_element(By.ID, "error").is_displayed()
    finally:
        page.get("about:blank")  # if Stop failed, leaving the page ends the request; the next test starts idle
        deadline = time.monotonic() + 10
        while _in_flight(base) and time.monotonic() < deadline:
            time.sleep(0.05)


def test_a_server_error_is_shown_in_the_page(page, server):
    _prompt(page, "the Ω cat")  # the character vocabulary has no Ω: a 400 from the server
    page.find_element(By.ID, "generate").click()
    error = page.find_element(By.ID, "error")
    _until(page, lambda d: error.is_displayed(), "no error message shown", timeout=10)
    assert "400" in error.text and "Ω" in error.text and "vocabulary" in error.text, error.text
    assert _status(page) == "error"
    assert page.find_elements(By.CSS_SELECTOR, TOKENS) == []
    assert page.find_element(By.ID, "generate").is_enabled() and not page.find_element(By.ID, "stop").is_enabled()
    # the next good request clears it
    _prompt(page, "the cat")
    _set(page, "max-tokens", 3)
    page.find_element(By.ID, "generate").click()
    assert _finished(page).startswith("finished"), _status(page)
    assert not error.is_displayed()


def _token_bytes(name: str) -> bytes:
    """A token string of logprobs back to its bytes (they were decoded with backslashreplace)."""
    parts = re.split(r"((?:\\x[0-9a-f]{2})+)", name)
    return b"".join(bytes.fromhex(p.replace("\\x", "")) if i % 2 else p.encode() for i, p in enumerate(parts))


def test_tokens_that_split_characters_get_the_right_text(browser, bpe_server):
    """A byte-level model's token may hold part of a character: its span holds the whole characters
    that it completes, and the page's text is still exactly the server's."""
    page = _open(browser, bpe_server)
    settings = {"prompt": "café", "max_tokens": 80, "temperature": 1.5, "seed": 3, "logprobs": 1}
    _prompt(page, settings["prompt"])
    for control in ("max-tokens", "temperature", "seed"):
        _set(page, control, settings[control.replace("-", "_")])
    page.find_element(By.ID, "generate").click()
    assert _finished(page).startswith("finished"), _status(page)
    want = _post(bpe_server.base + "/v1/completions", settings)["choices"][0]  # the same seed: the same text
    names = want["logprobs"]["tokens"]
    assert any("\\x" in name for name in names), names  # some token does split a character
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    pieces = [decoder.decode(_token_bytes(name)) for name in names]
    pieces[-1] += decoder.decode(b"", final=True)
    assert "".join(pieces) == want["text"]
    spans = _token_spans(page)
    assert [s["text"] for s in spans] == pieces
    assert _generated(page) == want["text"]
