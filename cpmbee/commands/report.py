"""``cpmbee report``: daily training logs of a run directory."""

from __future__ import annotations

import click


@click.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option(
    "--day",
    "days",
    multiple=True,
    metavar="YYYY-MM-DD",
    help="Log day to report (repeatable). Default: the latest day.",
)
@click.option("--all", "all_days", is_flag=True, help="Every log day of the run.")
@click.option(
    "--utc-offset",
    type=float,
    default=None,
    help="Day boundary as hours from UTC (CPM-Live used 16). Default: the run's own (run.json), as its daily metrics files.",
)
@click.option("--no-html", is_flag=True, help="Write only the Markdown report.")
@click.option("--stdout", "to_stdout", is_flag=True, help="Print the Markdown instead of writing files.")
def report(
    run_dir: str,
    days: tuple[str, ...],
    all_days: bool,
    utc_offset: float | None,
    no_html: bool,
    to_stdout: bool,
) -> None:
    """Write the daily training log(s) of RUN_DIR to RUN_DIR/reports/daily-YYYY-MM-DD.md (and .html).

    Each report gives the loss at the begin and end of the day (overall and per task), the data consumed
    that day and in total, the average gradient norm, throughput, progress against the planned budget, the
    day's checkpoints, generations on the fixed prompts and incidents (loss spikes, NaNs, restarts,
    crashes, pauses). Its "## Comment" section is for a human and is kept when the report is rewritten.

    \b
    Examples:
        cpmbee report runs/tiny-ccpm                   # the latest day
        cpmbee report runs/tiny-ccpm --all             # every day
        cpmbee report runs/tiny-ccpm --day 2024-05-02 --stdout
    """
    from ..live import report as rp

    if all_days and days:
        raise click.UsageError("give either --day or --all, not both")
    try:
        chosen = rp.days_to_report(run_dir, None if all_days or not days else list(days), utc_offset)
        if not chosen:
            raise click.ClickException(f"no metrics records in {run_dir}/metrics yet")
        if not all_days and not days:
            chosen = chosen[-1:]
        for day in chosen:
            if to_stdout:
                _, text = rp.build_report(run_dir, day, utc_offset_hours=utc_offset)
                click.echo(text)
                continue
            html_too = not no_html
            if html_too:
                try:
                    import markdown  # noqa: F401
                except ImportError:
                    click.echo(
                        "markdown is not installed (pip install 'cpmbee[live]'): writing Markdown only",
                        err=True,
                    )
                    html_too = False
            for path in rp.write_report(run_dir, day, utc_offset_hours=utc_offset, html_too=html_too):
                click.echo(f"wrote {path}")
    except ValueError as err:
        raise click.ClickException(str(err)) from err
