"""Daily training logs (cpmbee.live.report and `cpmbee report`)."""

from __future__ import annotations

import datetime as dt
import statistics

import pytest
from click.testing import CliRunner

from cpmbee.__main__ import cli
from cpmbee.live import report as rp

from .live_helpers import DAY1, DAY2, DAY3, PLAN_TOKENS, TOKENS_PER_STEP, build_run, train_record


@pytest.fixture
def run_dir(tmp_path):
    return build_run(tmp_path / "run")


def test_days_follow_the_offset(run_dir):
    # the sink named its files with the run's offset (+16); report days match them
    assert sorted(p.name for p in (run_dir / "metrics").iterdir()) == [
        f"metrics-{d}.jsonl" for d in (DAY1, DAY2, DAY3)
    ]
    assert rp.available_days(run_dir) == [DAY1, DAY2, DAY3]
    # with UTC days the same records fall on other dates (computed from their timestamps)
    assert rp.available_days(run_dir, 0) == ["2024-04-30", "2024-05-01", "2024-05-02"]
    assert rp.summarize_day(run_dir, "2024-05-01", utc_offset_hours=0).first_step == 61
    start, end = rp.day_bounds(DAY2, 16)
    assert start == dt.datetime(2024, 5, 1, 8, tzinfo=dt.timezone.utc) and end - start == dt.timedelta(days=1)
    assert rp.day_of(start.timestamp(), 16) == DAY2
    assert rp.day_of(start.timestamp() - 1, 16) == DAY1


def test_summary_numbers(run_dir):
    s = rp.summarize_day(run_dir, DAY2)
    assert (s.first_step, s.last_step, s.steps_logged) == (61, 120, 70)
    first = [train_record(step)["loss"] for step in range(61, 71)]
    last = [train_record(step)["loss"] for step in range(111, 121)]
    assert s.loss_begin == pytest.approx(statistics.fmean(first))
    assert s.loss_end == pytest.approx(statistics.fmean(last))
    assert s.task_loss["lm"][1] == pytest.approx(
        statistics.fmean(train_record(step)["task_loss"]["lm"] for step in range(111, 121))
    )
    assert s.tokens_day == 60 * TOKENS_PER_STEP  # net of the rewind: the day ends 60 steps after it began
    assert s.tokens_total == 120 * TOKENS_PER_STEP
    assert s.progress["progress"] == pytest.approx(120 * TOKENS_PER_STEP / PLAN_TOKENS)
    grads = [train_record(step)["grad_norm"] for step in [*range(61, 101), *range(91, 121)] if step != 80]
    assert s.grad_norm_mean == pytest.approx(statistics.fmean(grads))
    assert s.nonfinite_steps == [80]
    assert [c["step"] for c in s.checkpoints] == [90, 120]
    assert s.samples["step"] == 120
    assert [i["kind"] for i in s.incidents] == ["loss_spike", "nan"]
    assert [e["event"] for e in s.events] == ["crash", "resume"]
    assert s.rewinds[0][:2] == (100, 91)
    assert len(s.pauses) == 1 and s.pauses[0][1] - s.pauses[0][0] == pytest.approx(3660)
    assert s.eval["loss"] == 3.5
    day1 = rp.summarize_day(run_dir, DAY1)
    assert day1.tokens_day == 60 * TOKENS_PER_STEP and day1.loss_begin > day1.loss_end
    assert [e["event"] for e in day1.events] == ["start"] and day1.mixture["shares"]["ccpm"] == 0.75
    assert rp.summarize_day(run_dir, "2024-06-01").empty


def test_markdown_sections_and_escaping(run_dir):
    md = rp.render_markdown(rp.summarize_day(run_dir, DAY2))
    headings = [line for line in md.splitlines() if line.startswith("## ")]
    assert headings == [
        "## Loss",
        "## Completed Data",
        "## Average Grad Norm",
        "## Throughput",
        "## Progress",
        "## Checkpoints",
        "## Daily Test",
        "## Incidents",
        "## Comment",
    ]
    assert md.startswith("# Training log: tiny-synthetic (May 2, 2024)")
    assert "This day: 245.76 k tokens (245,760)" in md
    assert "60.00 % of the planned 819.20 k tokens" in md
    assert "**loss\\_spike** at step 75" in md and "(../incidents/step-00000075-loss_spike.json)" in md
    assert "**Crashed** at step 100" in md and "**Restart: resumed** at step 90" in md
    assert "**Pause**" in md and "**NaN/inf** loss or gradient norm at 1 step(s): 80" in md
    assert "> answer of step 120 to prompt 0" in md
    assert "skipped so far: ccpm 5, wiki 1" in md
    # untrusted text cannot inject HTML into the HTML report
    s = rp.summarize_day(run_dir, DAY2)
    s.samples["samples"][0]["output"]["<ans>"] = "<script>alert(1)</script> *bold*"
    page = rp.render_html(rp.render_markdown(s), "t")
    assert "<script>alert" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<table>" in page and "<h2>Daily Test</h2>" in page


def test_comment_is_kept_when_rewritten(run_dir):
    md_path, html_path = rp.report_paths(run_dir, DAY2)
    assert rp.write_report(run_dir, DAY2) == [md_path, html_path]
    assert rp.read_comment(md_path) == rp.COMMENT_PLACEHOLDER
    comment = "Loss went NaN at step 80; LR halved.\n\n- also: *restart* at 10:39\n"
    text = md_path.read_text(encoding="utf-8")
    md_path.write_text(text.replace(rp.COMMENT_PLACEHOLDER, comment), encoding="utf-8")
    rp.write_report(run_dir, DAY2)
    rewritten = md_path.read_text(encoding="utf-8")
    assert rewritten.endswith("## Comment\n\n" + comment)
    assert rewritten.count("## Comment") == 1
    assert "<em>restart</em>" in html_path.read_text(encoding="utf-8")
    assert not list((run_dir / "reports").glob(".*tmp*"))  # atomic writes leave nothing behind


def test_bad_day(run_dir):
    with pytest.raises(ValueError, match="day"):
        rp.write_report(run_dir, "2024-13-01")
    with pytest.raises(ValueError, match="day"):
        rp.write_report(run_dir, "../../etc")
    with pytest.raises(ValueError, match="no records"):
        rp.write_report(run_dir, "2024-06-01")
    with pytest.raises(ValueError, match="utc_offset_hours"):
        rp.summarize_day(run_dir, DAY2, utc_offset_hours=30)


def test_cli(run_dir):
    runner = CliRunner()
    out = runner.invoke(cli, ["report", str(run_dir)])
    assert out.exit_code == 0, out.output
    assert f"daily-{DAY3}.md" in out.output and f"daily-{DAY1}" not in out.output  # default: the latest day
    out = runner.invoke(cli, ["report", str(run_dir), "--all", "--no-html"])
    assert out.exit_code == 0, out.output
    assert sorted(p.name for p in (run_dir / "reports").glob("*.md")) == [
        f"daily-{d}.md" for d in (DAY1, DAY2, DAY3)
    ]
    out = runner.invoke(cli, ["report", str(run_dir), "--day", DAY2, "--stdout"])
    assert out.exit_code == 0 and out.output.startswith("# Training log: tiny-synthetic (May 2, 2024)")
    out = runner.invoke(cli, ["report", str(run_dir), "--day", "2024-06-01"])
    assert out.exit_code != 0 and "no records" in out.output
    out = runner.invoke(cli, ["report", str(run_dir), "--day", "yesterday"])
    assert out.exit_code != 0 and "day: expected YYYY-MM-DD" in out.output
    out = runner.invoke(cli, ["report", str(run_dir), "--all", "--day", DAY1])
    assert out.exit_code != 0
    empty = run_dir.parent / "empty"
    empty.mkdir()
    out = runner.invoke(cli, ["report", str(empty)])
    assert out.exit_code != 0 and "no metrics records" in out.output
