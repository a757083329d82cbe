"""The web page at `/` and the `/v1/cluster` view it polls.

The browser tests drive the system's headless Chromium (Debian's `chromium`, which
`.ci/install.sh --test` installs) through playwright against a real 1P1D server with an API
key; where no Chromium is installed they skip and say so.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from pd_local.api.backend import BackendStats, RankStats
from pd_local.api.cluster import RateMeter, cluster_view
from pd_local.engine.events import Load
from tests.server_utils import Served, metric_values, serving

KEY = "page-key-7"
AUTH = {"authorization": f"Bearer {KEY}"}
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def find_chromium() -> str | None:
    env = os.environ.get("PD_LOCAL_CHROMIUM")
    if env:
        return env
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


# -- no browser, no model ------------------------------------------------------------------------

def rank(n: int, role: str, prefilled: int = 0, generated: int = 0, queued_tokens: int = 0, **kw: int) -> RankStats:
    base = {"free_blocks": 90, "total_blocks": 100, "running": 1, "waiting": 2, "cached_blocks": 30}
    return RankStats(n, role, Load(**{**base, **kw}), queued_tokens=queued_tokens,
                     prefilled_tokens=prefilled, generated_tokens=generated)


def test_rate_meter_differences_counters_over_its_window() -> None:
    m = RateMeter(window_s=2.0)
    assert m.rates([rank(1, "decode", 0, 100)], now=10.0) == {1: (0.0, 0.0)}  # nothing to compare
    assert m.rates([rank(1, "decode", 50, 150)], now=11.0) == {1: (50.0, 50.0)}  # vs t=10
    assert m.rates([rank(1, "decode", 50, 190)], now=12.5) == {1: (20.0, 36.0)}  # t=10 is the base
    # t=10 and t=11 are now both >= 2 s old: the newer one, t=11, becomes the base
    assert m.rates([rank(1, "decode", 50, 250)], now=13.5) == {1: (0.0, 40.0)}
    # a rank the base never saw (none yet, but a future elastic world may add one) reads 0
    assert m.rates([rank(1, "decode", 50, 250), rank(2, "decode", 9, 9)], now=14.0)[2] == (0.0, 0.0)


def test_cluster_view_blocks_add_up_and_ranks_are_sorted() -> None:
    stats = BackendStats([rank(2, "decode", generated=7), rank(1, "prefill", queued_tokens=300)],
                         kv_bytes_transferred=4096, kv_transfer_seconds=0.25, kv_transfers=3)
    v = cluster_view(stats, RateMeter(), model="m", healthy=True, detail="2 workers", in_flight=4, now=1.0)
    assert [r["rank"] for r in v["ranks"]] == [1, 2]
    assert [r["role"] for r in v["ranks"]] == ["prefill", "decode"]
    kv = v["ranks"][0]["kv_blocks"]
    assert kv == {"total": 100, "used": 10, "cached": 30, "free": 60}
    assert kv["used"] + kv["cached"] + kv["free"] == kv["total"]
    assert v["ranks"][0]["queued_prefill_tokens"] == 300 and v["ranks"][1]["generated_tokens"] == 7
    assert v["kv_transfer"] == {"bytes": 4096, "seconds": 0.25, "count": 3}
    assert (v["status"], v["in_flight"], v["model"]) == ("ok", 4, "m")
    down = cluster_view(stats, RateMeter(), model="m", healthy=False, detail="rank 2 failed", in_flight=0)
    assert (down["status"], down["detail"]) == ("unavailable", "rank 2 failed")


# -- a real 1P1D server -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(smollm2_dir: Path) -> Iterator[Served]:
    with serving(smollm2_dir, "--prefill", "1", "--decode", "1", "--api-key", KEY) as s:
        yield s


@pytest.mark.slow
@pytest.mark.multiproc
def test_page_is_served_offline_and_the_cluster_view_needs_the_key(server: Served) -> None:
    page = httpx.get(f"{server.url}/", timeout=10)  # the page itself holds no secret: no key
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assets = ["/static/app.js", "/static/markdown.js", "/static/app.css"]
    for path in assets:
        assert path in page.text
    texts = [page.text] + [httpx.get(f"{server.url}{p}", timeout=10).text for p in assets]
    for text in texts:  # no CDN, no web font, nothing fetched from elsewhere
        assert "http://" not in text and "https://" not in text
    assert httpx.get(f"{server.url}/static/missing.js", timeout=10).status_code == 404
    assert httpx.get(f"{server.url}/health", timeout=10).json()["api_key_required"] is True
    denied = httpx.get(f"{server.url}/v1/cluster", timeout=10)
    assert denied.status_code == 401 and denied.json()["error"]["code"] == "invalid_api_key"
    c = httpx.get(f"{server.url}/v1/cluster", headers=AUTH, timeout=10).json()
    assert [(r["rank"], r["role"]) for r in c["ranks"]] == [(1, "prefill"), (2, "decode")]
    assert c["status"] == "ok" and c["model"] == "smollm2-135m-instruct"


# -- the browser ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    path = find_chromium()
    if path is None:
        pytest.skip("no Chromium installed (apt-get install chromium, as `.ci/install.sh --test` "
                    "does, or set PD_LOCAL_CHROMIUM): the web page's browser tests need one")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (pip install -e '.[test]')")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=path, args=CHROMIUM_ARGS)
        yield b
        b.close()


class Page:
    """A fresh browser tab on the server's page, recording console errors and request URLs."""

    def __init__(self, browser: object, url: str) -> None:
        self.ctx = browser.new_context(viewport={"width": 1280, "height": 860})  # type: ignore[attr-defined]
        self.p = self.ctx.new_page()
        self.url = url
        self.errors: list[str] = []
        self.requests: list[object] = []
        self.p.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.p.on("pageerror", lambda e: self.errors.append(f"uncaught: {e}"))
        self.p.on("request", lambda r: self.requests.append(r))

    def open_with_key(self) -> None:
        self.p.goto(f"{self.url}/")
        self.p.wait_for_selector("#key-dialog[open]")
        self.p.fill("#key-input", KEY)
        self.p.press("#key-input", "Enter")
        self.p.wait_for_selector('.rank[data-role="decode"]')

    def ask(self, text: str, max_tokens: int, system: str = "") -> None:
        self.p.click("#settings summary")
        self.p.fill("#max-tokens", str(max_tokens))
        self.p.fill("#temperature", "0")
        self.p.fill("#system", system)
        self.p.click("#settings summary")
        self.p.fill("#input", text)
        self.p.press("#input", "Enter")

    def last_answer(self) -> object:
        return self.p.locator(".msg.assistant").last


@pytest.fixture
def page(browser: object, server: Served) -> Iterator[Page]:
    pg = Page(browser, server.url)
    yield pg
    pg.ctx.close()


def wait_idle_and_free(url: str, timeout: float = 30.0) -> dict:
    """/v1/cluster once nothing is in flight and no rank holds a KV block (or at the timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        c = httpx.get(f"{url}/v1/cluster", headers=AUTH, timeout=10).json()
        if (c["in_flight"] == 0 and all(r["kv_blocks"]["used"] == 0 for r in c["ranks"])) \
                or time.monotonic() > deadline:
            return c
        time.sleep(0.2)


@pytest.mark.slow
@pytest.mark.multiproc
def test_key_flow_live_ranks_and_a_streamed_answer_with_its_timeline(page: Page, server: Served) -> None:
    p = page.p
    p.goto(f"{server.url}/")
    p.wait_for_selector("#key-dialog[open]")  # /health said a key is needed: asked before any 401
    assert p.locator(".rank").count() == 0
    assert page.errors == []
    p.fill("#key-input", "not-the-key")
    p.press("#key-input", "Enter")
    p.wait_for_function("document.getElementById('key-error').textContent.includes('refused')")
    assert p.locator("#key-dialog").get_attribute("open") is not None
    # the browser logs the refused request itself; nothing else may have gone wrong
    assert page.errors and all("401" in e for e in page.errors), page.errors
    page.errors.clear()
    p.fill("#key-input", KEY)
    p.press("#key-input", "Enter")
    p.wait_for_selector('.rank[data-rank="1"][data-role="prefill"]')
    assert p.locator('.rank[data-rank="2"] .badge').inner_text() == "decode"
    c = httpx.get(f"{server.url}/v1/cluster", headers={"Authorization": f"Bearer {KEY}"}, timeout=10).json()
    for r in c["ranks"]:  # each rank's threads and CPUs, as the rank reported them
        card = p.inner_text(f'.rank[data-rank="{r["rank"]}"]')
        assert f'{r["threads"]} on CPUs {r["cpus"]}' in card, card
    assert "1P1D" in p.inner_text("#status")

    # Shift+Enter is a new line, Enter sends
    p.fill("#input", "Name three colours")
    p.press("#input", "Shift+Enter")
    p.keyboard.type("and say one thing about each.")
    assert p.input_value("#input") == "Name three colours\nand say one thing about each."
    assert p.locator(".msg").count() == 0
    p.click("#settings summary")
    p.fill("#max-tokens", "48")
    p.fill("#temperature", "0")
    p.click("#settings summary")
    p.press("#input", "Enter")
    # streamed: text shows while the answer is still open, and more arrives after it
    p.wait_for_function("(document.querySelector('.msg.assistant.streaming .body') || {}).textContent > ''")
    partial = page.last_answer().locator(".body").inner_text()
    p.wait_for_selector(".msg.assistant .timeline", timeout=120_000)
    final = page.last_answer().locator(".body").inner_text()
    assert len(final) > len(partial) > 0
    facts = page.last_answer().locator(".tl-facts").inner_text()
    assert "prefill rank 1 → decode rank 2" in facts and "TTFT" in facts and "tok/s" in facts, facts
    for phase in ("queue", "prefill", "first_decode", "decode"):
        assert page.last_answer().locator(f'.tl-bar [data-phase="{phase}"]').count() == 1, phase

    # a second turn carries the first: the request holds both user messages and the answer
    p.fill("#input", "Thanks!")
    p.press("#input", "Enter")
    p.wait_for_function("document.querySelectorAll('.msg.assistant .timeline').length == 2",
                        timeout=120_000)
    chats = [r for r in page.requests if r.url.endswith("/v1/chat/completions")]
    assert len(chats) == 2
    roles = [m["role"] for m in chats[1].post_data_json["messages"]]
    assert roles == ["user", "assistant", "user"]
    # the key went in a header, never into a URL
    assert all(r.headers.get("authorization") == f"Bearer {KEY}" for r in chats)
    assert not any(KEY in r.url for r in page.requests) and KEY not in p.url
    if os.environ.get("PD_LOCAL_SCREENSHOT"):  # how docs/web-page.png is made
        p.screenshot(path=os.environ["PD_LOCAL_SCREENSHOT"])
    assert page.errors == []


@pytest.mark.slow
@pytest.mark.multiproc
def test_stop_closes_the_stream_and_the_server_frees_every_block(page: Page, server: Served) -> None:
    aborted = metric_values(server.url, "pd_local_requests_total", AUTH)['{outcome="abort"}']
    page.open_with_key()
    page.ask("Count from 1 to 1000, one number per line.", max_tokens=600)
    p = page.p
    p.wait_for_function("(document.querySelector('.msg.assistant.streaming .body') || {}).textContent > ''")
    # the live view sees the request on the decode rank while it streams
    p.wait_for_function("(document.querySelector('.rank[data-role=decode] dd') || {}).textContent == '1 / 0'",
                        timeout=10_000)
    p.click("#stop")
    p.wait_for_selector('.msg.assistant[data-finish="stopped"]')
    assert p.is_visible("#send") and not p.is_visible("#stop")
    c = wait_idle_and_free(server.url)
    assert c["in_flight"] == 0, c
    assert all(r["kv_blocks"]["used"] == 0 for r in c["ranks"]), c["ranks"]
    after = metric_values(server.url, "pd_local_requests_total", AUTH)['{outcome="abort"}']
    assert after == aborted + 1
    p.wait_for_function("document.getElementById('in-flight').textContent == '0 in flight'")
    assert page.errors == []


# Prompts SmolLM2 answers (greedy) with HTML holding a <script> tag; a CPU whose bf16 rounding
# changes one answer still has the others.
SCRIPT_PROMPTS = ["Write a minimal HTML page with a <script> tag that shows an alert.",
                  "Show me an HTML script tag example.",
                  "Write an HTML snippet with an inline <script> block."]


@pytest.mark.slow
@pytest.mark.multiproc
def test_a_reply_holding_a_script_tag_is_shown_as_text(page: Page, server: Served) -> None:
    page.open_with_key()
    p = page.p
    p.evaluate("() => { window.alert = () => { window.__alerted = true; }; }")
    for i, prompt in enumerate(SCRIPT_PROMPTS):
        page.ask(prompt, max_tokens=80)
        p.wait_for_function(f"document.querySelectorAll('.msg.assistant .timeline').length == {i + 1}",
                            timeout=120_000)
        answer = page.last_answer().locator(".body")
        if "<script" in answer.inner_text():
            break
    else:
        pytest.fail(f"none of {SCRIPT_PROMPTS} got a reply with <script> in it")
    assert answer.locator("script").count() == 0
    assert p.locator("#messages script, #messages iframe, #messages img").count() == 0
    assert p.evaluate("window.__alerted === undefined")
    assert page.errors == []


@pytest.mark.slow
@pytest.mark.multiproc
def test_markdown_renderer_escapes_every_tag_it_did_not_write(page: Page, server: Served) -> None:
    page.p.goto(f"{server.url}/")
    render = page.p.evaluate("""(texts) => texts.map((t) => {
        const d = document.createElement('div');
        d.innerHTML = renderMarkdown(t);
        return {tags: [...d.querySelectorAll('*')].map((e) => e.tagName.toLowerCase()), text: d.textContent,
                html: d.innerHTML};
    })""", [
        "<img src=x onerror=alert(1)> **bold** and `<b>code</b>`",
        "# Title\n- one\n- *two*\n\n1. first\n2. second",
        "```html\n<script>alert(1)</script>\n```\nafter",
        "a \" quote ' and & amp",
        "1. one\n\n2. two",
    ])
    first, lists, fence, quotes, split = render
    assert first["tags"] == ["p", "strong", "code"]
    assert "<img src=x onerror=alert(1)>" in first["text"] and "<b>code</b>" in first["text"]
    assert lists["tags"] == ["h3", "ul", "li", "li", "em", "ol", "li", "li"]
    assert fence["tags"] == ["pre", "code", "p"] and "<script>alert(1)</script>" in fence["text"]
    assert quotes["text"] == "a \" quote ' and & amp"
    assert split["html"] == '<ol><li>one</li></ol><ol start="2"><li>two</li></ol>'


@pytest.mark.slow
@pytest.mark.multiproc
def test_the_page_shows_each_elastic_ranks_mode_as_it_changes(browser: object, smollm2_dir: Path) -> None:
    """On --elastic 2 each rank card names its mode; set rank 2 to prefill (POST
    /v1/cluster/mode) and its card follows at the next poll."""
    with serving(smollm2_dir, "--elastic", "2", "--api-key", KEY) as s:
        pg = Page(browser, s.url)
        try:
            pg.p.goto(f"{s.url}/")
            pg.p.wait_for_selector("#key-dialog[open]")
            pg.p.fill("#key-input", KEY)
            pg.p.press("#key-input", "Enter")
            pg.p.wait_for_selector('.rank[data-rank="2"][data-mode="mixed"]')
            assert pg.p.locator('.rank[data-rank="1"] .badge').inner_text() == "elastic · mixed"
            r = httpx.post(f"{s.url}/v1/cluster/mode", headers=AUTH, json={"rank": 2, "mode": "prefill"}, timeout=10)
            assert r.status_code == 200, r.text
            pg.p.wait_for_selector('.rank[data-rank="2"][data-mode="prefill"]', timeout=10_000)
            assert pg.p.locator('.rank[data-rank="2"] .badge').inner_text() == "elastic · prefill"
            assert "queued prompt tokens" in pg.p.inner_text('.rank[data-rank="2"]')
            assert pg.errors == [], pg.errors
        finally:
            pg.ctx.close()
