"""The admin page in a real browser: Debian's chromium driven by playwright (never
``playwright install``). A new aggregate appears on ``/`` without a reload; a waterfall's bars
follow their targets' latencies; no JavaScript error on either page. The screenshots go to a
temporary directory; `make screenshots` writes them over docs/admin-*.png (SCREENSHOTS=docs)."""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from aggregator.lifecycle import AggregatorServer
from aggregator.v1 import aggregator_pb2 as pb
from tests.conftest import collect, http, rpc_target

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ADMIN = {"admin_address": "127.0.0.1:0", "max_targets": 1100}

playwright_api = pytest.importorskip("playwright.async_api")
expect = playwright_api.expect
pytestmark = pytest.mark.skipif(
    not Path(CHROMIUM).exists(), reason="chromium is not installed (make chromium installs it)"
)


class Page:
    """A browser page that remembers every JavaScript error and failed request."""

    def __init__(self, page: Any) -> None:
        self.page = page
        self.errors: list[str] = []
        page.on("pageerror", lambda error: self.errors.append(f"pageerror: {error}"))
        page.on(
            "console",
            lambda message: message.type == "error" and self.errors.append(message.text),
        )
        page.on("requestfailed", lambda request: self.errors.append(f"failed: {request.url}"))


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    async with playwright_api.async_playwright() as p:
        launched = await p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield launched
        finally:
            await launched.close()


async def open_page(browser: Any, url: str, width: int = 1280, height: int = 800) -> Page:
    context = await browser.new_context(viewport={"width": width, "height": height})
    page = Page(await context.new_page())
    response = await page.page.goto(url)
    assert response.status == 200
    return page


async def call(stub: Any, request_id: str, *targets: pb.Target) -> None:
    request = pb.AggregateRequest(targets=targets)
    await collect(stub.Aggregate(request, metadata=(("x-request-id", request_id),), timeout=5))


def base(server: AggregatorServer) -> str:
    return f"http://127.0.0.1:{server.admin_port}"


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the screenshots go: a temporary directory, unless SCREENSHOTS names one."""
    named = os.environ.get("SCREENSHOTS")
    return Path(named) if named else tmp_path_factory.mktemp("screenshots")


async def test_a_new_aggregate_appears_on_the_overview_without_a_reload(
    start_server, browser, screenshots
):
    server, stub = await start_server(server=ADMIN)
    await call(stub, "checkout-7f2c", http("cart", "/delay/12"), rpc_target("price", "Echo"))
    page = await open_page(browser, base(server) + "/")
    tab = page.page
    await tab.wait_for_selector('tr[data-request-id="checkout-7f2c"]', timeout=5000)
    assert await tab.locator("#upstreams tbody tr").count() == 3
    await call(
        stub, "search-91ab", http("results", "/delay/40"), http("ads", "/status/503"),
        http("reviews", "/x", "dead"),
    )  # fmt: skip
    # Polled within a second: no reload, no navigation.
    await tab.wait_for_selector('tr[data-request-id="search-91ab"]', timeout=5000)
    row = tab.locator('tr[data-request-id="search-91ab"]')
    assert "ads" in await row.inner_text()
    rows = await tab.locator("#aggregates tbody tr").evaluate_all(
        "rows => rows.map(r => r.dataset.requestId)"
    )
    assert rows[:2] == ["search-91ab", "checkout-7f2c"]  # newest first
    # (Waits through selectors: the page's Content-Security-Policy forbids eval.)
    await tab.check("#failed")
    await expect(tab.locator("#aggregates tbody tr")).to_have_count(1, timeout=5000)
    await tab.uncheck("#failed")
    await expect(tab.locator("#aggregates tbody tr")).to_have_count(2, timeout=5000)
    rest_row = await tab.locator("#upstreams tbody tr", has_text="rest").first.inner_text()
    assert "http" in rest_row
    await tab.screenshot(path=str(screenshots / "admin-overview.png"))
    phone = await open_page(browser, base(server) + "/", width=390, height=800)
    await phone.page.wait_for_selector('tr[data-request-id="search-91ab"]', timeout=5000)
    # Phone width: the page itself does not scroll sideways (wide tables scroll in their box).
    overflow = await phone.page.evaluate(
        "document.documentElement.scrollWidth - document.documentElement.clientWidth"
    )
    assert overflow <= 1
    assert page.errors == []
    assert phone.errors == []


async def test_the_waterfall_draws_bars_as_wide_as_their_latencies(start_server, browser):
    server, stub = await start_server(server=ADMIN)
    await call(
        stub, "waterfall-3",
        http("fast", "/delay/5"), http("medium", "/delay/60"), http("slow", "/delay/150"),
    )  # fmt: skip
    page = await open_page(browser, base(server) + "/aggregates/waterfall-3")
    tab = page.page
    await tab.wait_for_selector(".row .bar", timeout=5000)
    assert await tab.locator(".row .bar").count() == 3
    widths = {}
    for target in ("fast", "medium", "slow"):
        box = await tab.locator(f'.row[data-target="{target}"] .bar').bounding_box()
        widths[target] = box["width"]
    assert server.recent is not None
    record = server.recent.find("waterfall-3")
    assert record is not None
    latencies = {t.id: t.latency_ns / 1e6 for t in record.targets}
    # Bars share one axis: their widths are in the ratio of their latencies (a pixel of
    # rounding, and the 1px minimum, allowed).
    scale = widths["slow"] / latencies["slow"]
    for target in ("fast", "medium"):
        assert widths[target] == pytest.approx(latencies[target] * scale, abs=2.0), widths
    assert widths["fast"] < widths["medium"] < widths["slow"]
    await tab.hover('.row[data-target="medium"] .bar')
    details = await tab.locator("#details").inner_text()
    assert "rest" in details
    assert "/delay/60" in details
    assert "200" in details
    assert page.errors == []


async def test_the_waterfall_marks_attempts_cache_hits_fallbacks_and_the_deadline(
    start_server, browser, rest, screenshots
):
    server, stub = await start_server(
        server=ADMIN,
        cached={"kind": "http", "url": rest.url, "cache": {"ttl": "30s"}},
        stock={
            "kind": "http", "url": rest.url, "retry": {"attempts": 3, "backoff": "5ms"},
            "circuit_breaker": {"fail_max": 3, "reset_timeout": "30s"},
        },
    )  # fmt: skip
    await call(stub, "warm-cache", http("profile", "/count/profile", "cached"))
    ads = http("ads", "/status/503")
    ads.fallback.string_value = "no ads"
    targets = (
        http("cart", "/delay/5"), http("prices", "/delay/60"), http("reviews", "/delay/150"),
        http("profile", "/count/profile", "cached"), http("stock", "/flaky/stock/1", "stock"),
        ads, http("recommendations", "/delay/40", depends_on=["cart"]),
        http("coupons", "/x", "dead"),
    )  # fmt: skip
    request = pb.AggregateRequest(targets=targets)
    await collect(
        stub.Aggregate(request, metadata=(("x-request-id", "checkout-4c1d"),), timeout=0.4)
    )
    page = await open_page(browser, base(server) + "/aggregates/checkout-4c1d")
    tab = page.page
    await tab.wait_for_selector(".row .bar", timeout=5000)
    assert await tab.locator(".row").count() == len(targets)
    assert await tab.locator('.row[data-target="profile"] .bar.cache-hit').count() == 1
    assert await tab.locator('.row[data-target="ads"] .bar.fallback').count() == 1
    assert await tab.locator('.row[data-target="stock"] .attempt').count() == 1
    assert await tab.locator(".deadline").count() == 1
    # The cut-off the server applied (~400 ms less its 20 ms margin), not the bare deadline.
    cutoff = await tab.locator(".deadline").get_attribute("title")
    assert re.fullmatch(
        r"cut-off \d+\.\d ms \(deadline \d+\.\d ms less a 20\.0 ms margin\)", cutoff
    )
    assert "beyond the axis" not in await tab.locator("#summary").inner_text()

    def background(target: str) -> Any:
        return tab.locator(f'.row[data-target="{target}"] .bar').evaluate(
            "bar => getComputedStyle(bar).backgroundColor"
        )

    assert await background("profile") != await background("cart")  # cache hit, ok
    await tab.click('.row[data-target="stock"] .bar')
    assert "attempts\n2\n" in await tab.locator("#details").inner_text()
    await tab.screenshot(path=str(screenshots / "admin-waterfall.png"))
    phone = await open_page(browser, base(server) + "/aggregates/checkout-4c1d", 390, 800)
    await phone.page.wait_for_selector(".row .bar", timeout=5000)
    overflow = await phone.page.evaluate(
        "document.documentElement.scrollWidth - document.documentElement.clientWidth"
    )
    assert overflow <= 1
    assert page.errors == []
    assert phone.errors == []


async def test_the_waterfall_of_a_thousand_targets_draws_each(start_server, browser):
    server, stub = await start_server(server=ADMIN)
    listing = http("list", "/json", query={"body": json.dumps({"items": list(range(1000))})})
    each = http("detail", "/delay/1", depends_on=["list"], for_each="{{list.items}}")
    each.http.path = "/echo/item/{{item}}"
    failing = http("broken", "/status/503")
    failing.fallback.string_value = "none"
    await call(stub, "wide-1000", listing, each, failing)
    page = await open_page(browser, base(server) + "/aggregates/wide-1000")
    tab = page.page
    await tab.wait_for_selector(".row .bar", timeout=5000)
    assert await tab.locator(".row").count() == 1002
    assert await tab.locator(".row .bar.fallback").count() == 1
    # Dense rows: the thousand bars fit in a few screens.
    height = await tab.locator("#rows").evaluate("rows => rows.scrollHeight")
    assert height < 1002 * 8
    await tab.check("#only-failed")
    await expect(tab.locator(".row")).to_have_count(1, timeout=5000)
    assert page.errors == []


async def test_an_unknown_aggregate_says_so_without_errors(start_server, browser):
    server, _ = await start_server(server=ADMIN)
    context = await browser.new_context()
    page = Page(await context.new_page())
    response = await page.page.goto(base(server) + "/aggregates/never-seen")
    assert response.status == 404
    assert page.errors == [] or all("404" in error for error in page.errors)
