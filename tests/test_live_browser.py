"""The live dashboard in a real headless browser (Debian's chromium driven by Playwright).

The page is served over a synthetic run directory; the test checks that the charts are drawn (canvas
pixels, series point counts) and that the page follows the run without a reload as records are appended,
the job rewinds (resume) and its status changes. Set CPMBEE_SCREENSHOT_DIR to keep the screenshots.
CI (``.ci/run``) installs chromium and sets CPMBEE_REQUIRE_BROWSER=1, which turns a missing browser into a
failure instead of a skip.
"""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

import pytest

from cpmbee.train.metrics import JsonlSink, MetricsLogger

from .live_helpers import DAY2, LiveServer, append_live_steps, build_run, train_record, write_status

pytestmark = pytest.mark.slow

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def _chromium() -> str:
    reason = None
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        reason = "the `playwright` Python package is not installed (pip install -e '.[dev]')"
    wanted = os.environ.get("CPMBEE_CHROMIUM")
    if wanted:
        path = wanted if os.access(wanted, os.X_OK) else None
    else:
        path = shutil.which("chromium") or shutil.which("chromium-browser")
    if reason is None and path is None:
        reason = (
            f"no chromium binary at {wanted}" if wanted else "no chromium binary (apt-get install chromium)"
        )
    if reason is not None:
        if os.environ.get("CPMBEE_REQUIRE_BROWSER"):
            pytest.fail(f"browser test required but {reason}")
        message = f"SKIPPED: the dashboard browser test needs a headless chromium: {reason}"
        warnings.warn(message, stacklevel=2)
        pytest.skip(message)
    return path


@pytest.fixture
def browser_page():
    executable = _chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.errors = []
            page.on("pageerror", lambda err: page.errors.append(str(err)))
            page.on("console", lambda msg: page.errors.append(msg.text) if msg.type == "error" else None)
            yield page
        finally:
            browser.close()


def _shot(page, tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    page.screenshot(path=str(path), full_page=True)
    keep = os.environ.get("CPMBEE_SCREENSHOT_DIR")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(keep) / name)


LENGTHS = (
    "Object.fromEntries(Object.entries(window.cpmbeeLive.charts).map(([k, v]) => [k, v.u.data[0].length]))"
)
INK = """(id) => {
  const c = document.querySelector('#chart-' + id + ' canvas');
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  let n = 0;
  for (let i = 0; i < d.length; i += 4) if (d[i + 3] > 0 && (d[i] < 200 || d[i + 1] < 200 || d[i + 2] < 200)) n++;
  return n;
}"""


def test_dashboard_renders_and_follows_the_run(tmp_path, browser_page):
    page = browser_page
    run_dir = build_run(tmp_path / "run", finished=False)
    with LiveServer(run_dir, poll_interval=0.1) as server:
        page.goto(server.url + "/")
        page.wait_for_function(
            "window.cpmbeeLive && window.cpmbeeLive.ready && window.cpmbeeLive.connected", timeout=20000
        )
        page.wait_for_function(
            "window.cpmbeeLive.charts.loss && window.cpmbeeLive.charts.loss.u.data[0].length === 150"
        )
        page.evaluate("window.__noReload = 1")

        # charts: one per logged metric, drawn on canvases, with every point
        lengths = page.evaluate(LENGTHS)
        assert set(lengths) == {"loss", "lr", "grad_norm", "tokens_per_s", "tokens_seen", "mem_gb", "fill"}
        assert all(n == 150 for n in lengths.values()), lengths
        series = page.evaluate("window.cpmbeeLive.charts.loss.u.series.map(s => s.label)")
        assert series[1:] == ["loss", "lm", "mlm", "eval loss"]
        assert page.locator("#charts canvas").count() >= 7
        for chart in ("loss", "lr", "grad_norm"):
            assert page.evaluate(INK, chart) > 500, f"{chart} chart looks empty"
        # the panels
        assert page.text_content("#state") == "running"
        assert page.text_content("#k-step") == "150"
        assert page.text_content("#k-progress").startswith("75.00 % of 819.20 k tokens")
        incidents = page.locator("#incident-rows tr")
        assert incidents.count() == 6  # start, loss spike, nan, crash, resume, rewind
        assert "loss spike" in page.text_content("#incident-rows")
        assert page.locator("#checkpoint-rows tr").count() == 5
        assert page.locator("#checkpoint-rows").inner_text().count("pruned") == 3
        assert page.locator("#samples .sample").count() == 2
        assert "answer of step 150 to prompt 1" in page.text_content("#samples")
        assert page.locator("#mixture-rows tr").count() == 2
        page.wait_for_function("document.querySelectorAll('#inspect-rows tr').length === 3")
        page.wait_for_function("document.querySelectorAll('#inspect-chart canvas').length > 0")
        page.wait_for_function("document.querySelectorAll('#report-rows tr').length === 3")
        # the raw samples of the loss-spike batch, shown as text (the <script> in them is not run)
        page.click("#incident-rows button")
        page.wait_for_function("!document.getElementById('incident-detail').hidden")
        assert "<script>x</script>" in page.text_content("#incident-detail")
        _shot(page, tmp_path, "dashboard-initial.png")

        # new records appear without a reload
        updates = page.evaluate("window.cpmbeeLive.updates")
        append_live_steps(run_dir, 151, 5)
        page.wait_for_function("window.cpmbeeLive.charts.loss.u.data[0].length === 155", timeout=10000)
        assert page.evaluate("window.cpmbeeLive.updates") > updates
        assert page.text_content("#k-step") == "155"
        assert all(n == 155 for n in page.evaluate(LENGTHS).values())
        with MetricsLogger([JsonlSink(run_dir / "metrics", utc_offset_hours=16)]) as logger:
            logger.log(
                "incident",
                155,
                kind="loss_spike",
                message="loss spike (lm: 2.0 → 9.0)",
                detail={"lm": [2.0, 9.0]},
            )
            logger.log("event", 153, event="resume", message="resumed from step-00000153")
            logger.log("train", 153, **train_record(153))
            logger.log(
                "inspect",
                160,
                params={"input_embedding.weight": {"norm": 9.0, "std": 0.1}, "new.group": {"norm": 1.0}},
            )
        # the job rewound to 153: the curves are cut back to it
        page.wait_for_function("window.cpmbeeLive.charts.loss.u.data[0].length === 153", timeout=10000)
        page.wait_for_function("document.querySelectorAll('#incident-rows tr').length === 9")
        page.wait_for_function("document.querySelectorAll('#inspect-rows tr').length === 4")
        assert "loss spike (lm: 2.0 → 9.0)" in page.text_content("#incident-rows")
        # status changes show up too
        write_status(run_dir, "crashed", 153)
        page.wait_for_function("document.getElementById('state').textContent === 'crashed'", timeout=10000)
        assert page.evaluate("window.__noReload") == 1
        # a long-running page halves its resolution instead of growing without bound
        page.evaluate("window.cpmbeeLive.S.maxPoints = 40")
        append_live_steps(run_dir, 154, 1)
        page.wait_for_function("window.cpmbeeLive.charts.loss.u.data[0].length === 77", timeout=10000)
        xs = page.evaluate("window.cpmbeeLive.charts.loss.u.data[0]")
        assert xs[-1] == 154 and xs == sorted(xs) and xs[0] == 2  # pairs (1,2), (3,4), ...: last step of each
        # switching the x axis redraws with tokens
        page.select_option("#x-axis", "tokens_seen")
        page.wait_for_function("window.cpmbeeLive.charts.loss.u.data[0][0] === 2 * 4096")
        _shot(page, tmp_path, "dashboard-after-updates.png")

        # the daily log page
        page.goto(f"{server.url}/reports/{DAY2}")
        assert page.text_content("h1").startswith("Training log: tiny-synthetic")
        assert page.locator("h2").all_text_contents()[-1] == "Comment"
        _shot(page, tmp_path, "daily-report.png")
    assert not page.errors, page.errors
