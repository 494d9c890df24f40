"""Summarise a run's output: which model won, and can the judge be trusted?

Streams over the NDJSON records once (files larger than memory work, `.gz` too, `-` is
stdin) and prints a leaderboard and the judge's health as plain-text tables on stdout.
`--png DIR` draws the same as plots and `--html FILE` writes one self-contained page with
the tables and plots embedded; both need matplotlib (`pip install 'streamfeedback[report]'`).
"""

from __future__ import annotations

import argparse
import base64
import gzip
import html
import io
import logging
import sys
import textwrap
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, cast

import msgspec

from .._judge.aspects import ASPECTS
from .._records import Record
from ._stats import SCALE, Accumulator, Moments, Summary

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["HELP", "configure_parser", "main", "read_summary", "render_text"]

HELP = "leaderboard, judge health and plots from a run's output"

log = logging.getLogger("streamfeedback.report")

EXIT_OK, EXIT_USAGE = 0, 2
_EXTRA_HINT = "pip install 'streamfeedback[report]'"
_BAD_LINES_SHOWN = 10
_NA_ASPECTS = frozenset(name for name, spec in ASPECTS.items() if spec.allows_na)


class ReportError(Exception):
    """The input cannot be reported on: the message names the file (and line)."""


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """The report's options."""
    parser.add_argument("output", metavar="OUT.ndjson", help="a run's records ('-' for stdin)")
    parser.add_argument("--html", metavar="FILE", help="write one self-contained HTML page")
    parser.add_argument("--png", metavar="DIR", help="write the plots as PNG files into DIR")
    parser.add_argument(
        "--aspect",
        help="rank the models on this aspect (default: each record's `ratings`, its first aspect)",
    )
    parser.add_argument(
        "--strict",
        action="store_true",
        help="stop at the first line that is not a record (default: skip it with a warning)",
    )


def main(args: argparse.Namespace) -> int:
    """Read, summarise, print; then plots and HTML when asked."""
    plotting = bool(args.png or args.html) and _have_matplotlib()
    if args.png and not plotting:
        log.error("--png needs matplotlib: %s", _EXTRA_HINT)
        return EXIT_USAGE
    if args.html and not plotting:
        log.warning("matplotlib is not installed: the HTML page gets no plots (%s)", _EXTRA_HINT)
    try:
        summary = read_summary(args.output, aspect=args.aspect, strict=args.strict)
    except ReportError as exc:
        log.error("%s", exc)
        return EXIT_USAGE
    sys.stdout.write(render_text(summary))
    sys.stdout.flush()
    plots = render_plots(summary) if plotting else {}
    if args.png:
        folder = Path(args.png)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            for name, data in plots.items():
                (folder / f"{name}.png").write_bytes(data)
        except OSError as exc:
            log.error("%s: cannot write the plots: %s", folder, exc)
            return EXIT_USAGE
        log.info("wrote %d plots to %s", len(plots), folder)
    if args.html:
        try:
            Path(args.html).write_text(render_html(summary, plots, args.output), encoding="utf-8")
        except OSError as exc:
            log.error("%s: cannot write the page: %s", args.html, exc)
            return EXIT_USAGE
        log.info("wrote %s", args.html)
    return EXIT_OK


def _have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


# Reading


@contextmanager
def _open(path: str) -> Iterator[IO[bytes]]:
    if path == "-":
        yield sys.stdin.buffer
        return
    try:
        fh = gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")
    except OSError as exc:
        raise ReportError(f"{path}: cannot open: {exc.strerror or exc}") from exc
    with fh:
        yield cast("IO[bytes]", fh)


def read_summary(path: str, *, aspect: str | None = None, strict: bool = False) -> Summary:
    """One pass over the file: a line that is not a record is skipped with a warning (or,
    `strict`, stops the report); a file with no record at all is an error.

    :raises ReportError: the file cannot be read, or holds no record.
    """
    decoder = msgspec.json.Decoder(Record)
    acc = Accumulator(aspect)
    bad = 0
    first_bad: str | None = None
    name = "<stdin>" if path == "-" else path
    with _open(path) as fh:
        try:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    acc.add(decoder.decode(line))
                except (msgspec.DecodeError, ValueError) as exc:
                    where = f"{name}:{lineno}: not a record: {exc}"
                    if strict:
                        raise ReportError(where) from exc
                    bad += 1
                    first_bad = first_bad or where
                    if bad <= _BAD_LINES_SHOWN:
                        log.warning("%s (line skipped)", where)
        except (OSError, EOFError) as exc:
            raise ReportError(f"{name}: cannot read: {exc}") from exc
    if bad > _BAD_LINES_SHOWN:
        log.warning("%s: %d lines skipped in all", name, bad)
    summary = acc.summary()
    if summary.records == 0:
        if first_bad is not None:
            raise ReportError(first_bad)
        if summary.skipped:
            raise ReportError(f"{name}: no record has the aspect {aspect!r}")
        raise ReportError(f"{name}: no records")
    if summary.skipped:
        log.warning("%s: %d records without the aspect %r left out", name, summary.skipped, aspect)
    return summary


# Formatting helpers


def _num(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _ci(m: Moments) -> str:
    ci = m.ci95
    return "-" if ci is None else f"[{ci[0]:.2f}, {ci[1]:.2f}]"


def _finish(counts: dict[str, int]) -> str:
    return " ".join(f"{reason}:{n}" for reason, n in counts.items()) or "-"


def _ratings_keys(summary: Summary) -> list[int]:
    """The rating values to show: 1..5 and anything else that occurred."""
    return sorted(set(range(1, 6)) | set(summary.histogram))


class _Table:
    """Rows of cells with a header; text columns left-aligned, numeric ones right-aligned."""

    def __init__(
        self, title: str, header: Sequence[str], left: int = 1, plot: str | None = None
    ) -> None:
        self.title = title
        self.plot = plot
        self.header = list(header)
        self.left = left
        self.rows: list[list[str]] = []
        self.notes: list[str] = []

    def add(self, *cells: object) -> None:
        self.rows.append([str(c) for c in cells])

    def text(self) -> str:
        widths = [
            max(len(r[i]) for r in [self.header, *self.rows]) for i in range(len(self.header))
        ]
        lines = [self.title, "=" * len(self.title)]
        for row in [self.header, *self.rows]:
            cells = [
                c.ljust(w) if i < self.left else c.rjust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            ]
            lines.append("  ".join(cells).rstrip())
            if row is self.header:
                lines.append("  ".join("-" * w for w in widths))
        for note in self.notes:
            lines.extend(textwrap.wrap(note, 100, subsequent_indent="  "))
        return "\n".join(lines) + "\n"

    def html(self) -> str:
        e = html.escape
        head = "".join(f"<th>{e(h)}</th>" for h in self.header)
        body = "".join(
            "<tr>"
            + "".join(
                f'<td class="{"l" if i < self.left else "r"}">{e(c)}</td>'
                for i, c in enumerate(row)
            )
            + "</tr>"
            for row in self.rows
        )
        notes = "".join(f"<p class=note>{e(n)}</p>" for n in self.notes)
        return (
            f"<h2>{e(self.title)}</h2><table><thead><tr>{head}</tr></thead>"
            f"<tbody>{body}</tbody></table>{notes}"
        )


# Tables


def _tables(summary: Summary) -> list[_Table]:
    tables = [_leaderboard(summary), _wins(summary), _health(summary), _histograms(summary)]
    if summary.positions:
        tables.append(_positions(summary))
    if len(summary.aspects) > 1:
        tables.append(_aspects(summary))
    if summary.agreement:
        tables.append(_agreement(summary))
    return tables


def _leaderboard(s: Summary) -> _Table:
    t = _Table(
        f"Leaderboard ({s.aspect or 'ratings'})",
        [
            "#",
            "model",
            "responses",
            "rated",
            "mean",
            "95% CI",
            "top-rated",
            "win rate",
            "tokens",
            "capped",
            "finish reasons",
        ],
        left=2,
        plot="leaderboard",
    )
    for rank, row in enumerate(s.models, 1):
        t.add(
            rank,
            row.model,
            row.responses,
            row.rated,
            _num(row.mean),
            "-" if row.ci95 is None else f"[{row.ci95[0]:.2f}, {row.ci95[1]:.2f}]",
            _pct(row.top_share),
            _pct(row.win_rate),
            _num(row.tokens_mean, 1),
            _pct(row.length_share),
            _finish(row.finish),
        )
    t.notes = [
        "mean: mean of the non-null ratings; 95% CI: mean +/- 1.96*sd/sqrt(n), normal "
        "approximation, sd the sample sd, n = rated responses, kept within the 1-5 scale "
        "(an interval cut at the scale's end means few ratings).",
        "top-rated: share of the rated responses that got the highest rating of their prompt "
        "(ties count for all tied). win rate: (wins + 0.5*ties) / shared prompts, against all "
        "other models, over prompts where both have a rating.",
        "tokens: mean output tokens; capped: share of responses with finish reason 'length'.",
    ]
    return t


def _wins(s: Summary) -> _Table:
    names = [r.model for r in s.models]
    t = _Table(
        "Pairwise win rate (row against column; shared prompts in parentheses)",
        ["#", "model", *(f"#{i}" for i in range(1, len(names) + 1))],
        left=2,
        plot="win_rate",
    )
    for i, a in enumerate(names, 1):
        cells = []
        for b in names:
            wr = s.win_rate(a, b)
            cells.append("" if a == b else "-" if wr is None else f"{100 * wr[0]:.0f}% ({wr[1]})")
        t.add(i, a, *cells)
    t.notes = ["win rate of A against B = (wins + 0.5*ties) / prompts where both have a rating."]
    return t


def _health(s: Summary) -> _Table:
    t = _Table("Judge health", ["", "value"], left=2)
    t.add("judge", ", ".join(s.judges))
    t.add("records", f"{s.records}" + (f" ({s.simulated} simulated)" if s.simulated else ""))
    if s.skipped:
        t.add("records without the aspect", s.skipped)
    t.add("responses", s.responses)
    t.add(
        "null (unreadable) ratings",
        f"{s.nulls} ({_pct(s.nulls / s.responses if s.responses else None)})",
    )
    t.add(
        "records re-asked",
        f"{s.reasked} ({_pct(s.reasked / s.records)}), {s.reasks} extra judge requests",
    )
    na = [a for a in s.aspects if a.aspect in _NA_ASPECTS]
    t.add(
        "N/A share",
        "; ".join(
            f"{a.aspect}: {_pct(a.not_applicable / a.responses)} answered N/A"
            for a in na
            if a.responses
        )
        or "- (no aspect that allows N/A was rated)",
    )
    t.add(
        "shuffled for the judge",
        f"{s.shuffled} of {s.records} records"
        + ("" if s.shuffled else " (no position bias check)"),
    )
    t.notes = [
        "null: no rating: unreadable, or N/A where the aspect allows it (honesty); records "
        "mark N/A answers in `not_applicable`, so the N/A share is exact."
    ]
    return t


def _histograms(s: Summary) -> _Table:
    keys = _ratings_keys(s)
    t = _Table(
        f"Rating histogram ({s.aspect or 'ratings'})",
        ["model", *map(str, keys), "null", "mean"],
        plot="histograms",
    )
    for row in s.models:
        t.add(row.model, *(row.histogram.get(k, 0) for k in keys), row.nulls, _num(row.mean))
    total = Moments()
    for k, n in s.histogram.items():
        total.n += n
        total.total += k * n
        total.squares += k * k * n
    t.add("all", *(s.histogram.get(k, 0) for k in keys), s.nulls, _num(total.mean))
    return t


def _positions(s: Summary) -> _Table:
    t = _Table(
        "Position bias (rating by the position the judge saw the response in)",
        ["position", "rated", "mean", "95% CI"],
        plot="position_bias",
    )
    for p in s.positions:
        t.add(f"text {p.position}", p.ratings.n, _num(p.ratings.mean), _ci(p.ratings))
    t.notes = [f"from the {s.shuffled} records whose responses were shuffled (judge_order)."]
    return t


def _aspects(s: Summary) -> _Table:
    t = _Table(
        "Aspects", ["aspect", "responses", "rated", "null", "mean", "95% CI", "re-asked", "re-asks"]
    )
    for a in s.aspects:
        t.add(
            a.aspect + (" (N/A allowed)" if a.aspect in _NA_ASPECTS else ""),
            a.responses,
            a.ratings.n,
            f"{a.nulls} ({_pct(a.nulls / a.responses if a.responses else None)})",
            _num(a.ratings.mean),
            _ci(a.ratings),
            f"{a.reasked} ({_pct(a.reasked / a.results if a.results else None)})",
            a.reasks,
        )
    return t


def _agreement(s: Summary) -> _Table:
    t = _Table(
        "Aspect agreement",
        ["aspect", "aspect", "responses", "Pearson r"],
        left=2,
        plot="aspect_agreement",
    )
    for a in s.agreement:
        t.add(a.first, a.second, a.n, _num(a.r, 3))
    t.notes = ["Pearson correlation of the two aspects' ratings over responses rated on both."]
    return t


def render_text(summary: Summary) -> str:
    """The plain-text report: aligned tables, one after the other (a simulated run says so
    first)."""
    banner = _simulated_banner(summary)
    tables = "\n".join(t.text() for t in _tables(summary))
    return f"{banner}\n\n{tables}" if banner else tables


# Plots


def render_plots(summary: Summary) -> dict[str, bytes]:
    """PNG bytes per plot name; needs matplotlib (imported here, not at module load)."""
    makers: list[tuple[str, Callable[[Summary], Figure | None]]] = [
        ("leaderboard", _plot_leaderboard),
        ("histograms", _plot_histograms),
        ("win_rate", _plot_win_rate),
        ("position_bias", _plot_positions),
        ("aspect_agreement", _plot_agreement),
    ]
    plots: dict[str, bytes] = {}
    for name, make in makers:
        fig = make(summary)
        if fig is None:
            continue
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=110)
        plots[name] = buffer.getvalue()
    return plots


def _figure(width: float, height: float) -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _plot_leaderboard(s: Summary) -> Figure | None:
    rows = [r for r in s.models if r.mean is not None][::-1]
    if not rows:
        return None
    fig = _figure(8, 1.2 + 0.45 * len(rows))
    ax = fig.add_subplot()
    low, high = _scale(s)
    means = [r.mean or low for r in rows]
    errors = _error_bars(means, [r.ci95 for r in rows])
    ax.barh(
        [r.model for r in rows],
        [m - low for m in means],
        left=low,
        xerr=errors,
        capsize=4,
        color="#4c72b0",
    )
    for y, m in enumerate(means):
        inside = m - low > 0.6  # on the bar in white where it is long enough, else beside it
        x, colour = (low + 0.05, "white") if inside else (m + 0.05, "black")
        ax.text(x, y, f"{m:.2f}", va="center", fontsize=8, color=colour)
    ax.set_xlabel("mean rating (error bars: 95% CI, normal approximation within the scale)")
    ax.set_xlim(low, high)
    ax.set_xticks(range(low, high + 1))
    ax.set_title(f"Leaderboard ({s.aspect or 'ratings'}){_sim_note(s)}")
    return fig


def _plot_histograms(s: Summary) -> Figure | None:
    keys = _ratings_keys(s)
    rows = s.models
    if not rows:
        return None
    columns = min(3, len(rows))
    lines = -(-len(rows) // columns)
    fig = _figure(3.2 * columns, 2.4 * lines + 0.4)
    fig.suptitle(f"Rating distribution per model ({s.aspect or 'ratings'}){_sim_note(s)}")
    labels = [*map(str, keys), "null"]
    for i, row in enumerate(rows):
        ax = fig.add_subplot(lines, columns, i + 1)
        counts = [row.histogram.get(k, 0) for k in keys] + [row.nulls]
        total = sum(counts) or 1
        colors = ["#4c72b0"] * len(keys) + ["#c44e52"]
        ax.bar(labels, [c / total for c in counts], color=colors)
        ax.set_ylim(0, 1)
        if i % columns == 0:
            ax.set_ylabel("share of responses", fontsize=8)
        ax.set_title(f"{row.model} (n={row.responses})", fontsize=9)
        ax.tick_params(labelsize=8)
    return fig


def _scale(s: Summary) -> tuple[int, int]:
    """The rating axis: UltraFeedback's 1-5, widened only for values that occurred."""
    keys = _ratings_keys(s)
    return min(SCALE[0], keys[0]), max(SCALE[1], keys[-1])


def _error_bars(
    means: list[float], cis: Sequence[tuple[float, float] | None]
) -> list[list[float]]:
    """Asymmetric error bars (below, above) from intervals that may be clipped."""
    below = [m - ci[0] if ci else 0.0 for m, ci in zip(means, cis, strict=True)]
    above = [ci[1] - m if ci else 0.0 for m, ci in zip(means, cis, strict=True)]
    return [below, above]


def _sim_note(s: Summary) -> str:
    return " - SIMULATED engines" if s.simulated else ""


def _cell_text_colour(image: Any, value: float) -> str:
    """Black on light cells, white on dark ones: by the cell colour's relative luminance."""
    red, green, blue, _ = image.cmap(image.norm(value))

    def linear(c: float) -> float:
        return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4

    luminance = 0.2126 * linear(red) + 0.7152 * linear(green) + 0.0722 * linear(blue)
    return "black" if luminance > 0.179 else "white"


def _plot_win_rate(s: Summary) -> Figure | None:
    names = [r.model for r in s.models]
    if len(names) < 2:
        return None
    import numpy as np

    grid = np.full((len(names), len(names)), np.nan)
    shared = np.zeros((len(names), len(names)), dtype=int)
    for i, a in enumerate(names):
        for j, b in enumerate(names):
            wr = s.win_rate(a, b)
            if wr is not None:
                grid[i, j], shared[i, j] = wr
    return _heatmap(
        names,
        grid,
        cmap="RdBu",
        limits=(0, 1),
        label=lambda i, j: f"{grid[i, j]:.2f}\nn={shared[i, j]}",
        fontsize=7,
        title=f"Win rate, row against column (n = shared prompts){_sim_note(s)}",
    )


def _plot_positions(s: Summary) -> Figure | None:
    rows = [p for p in s.positions if p.ratings.mean is not None]
    if not rows:
        return None
    fig = _figure(6, 3.5)
    ax = fig.add_subplot()
    low, high = _scale(s)
    means = [p.ratings.mean or low for p in rows]
    errors = _error_bars(means, [p.ratings.ci95 for p in rows])
    ax.bar(
        [f"text {p.position}" for p in rows],
        [m - low for m in means],
        bottom=low,
        yerr=errors,
        capsize=4,
        color="#55a868",
    )
    ax.set_ylim(low, high)
    ax.set_yticks(range(low, high + 1))
    ax.set_ylabel("mean rating (95% CI)")
    ax.set_title(f"Position bias ({s.shuffled} shuffled records)")
    return fig


def _plot_agreement(s: Summary) -> Figure | None:
    if not s.agreement:
        return None
    import numpy as np

    names = sorted({a.first for a in s.agreement} | {a.second for a in s.agreement})
    grid = np.eye(len(names))
    for a in s.agreement:
        i, j = names.index(a.first), names.index(a.second)
        grid[i, j] = grid[j, i] = np.nan if a.r is None else a.r
    return _heatmap(
        names,
        grid,
        cmap="viridis",
        limits=(-1, 1),
        label=lambda i, j: f"{grid[i, j]:.2f}",
        fontsize=8,
        title="Aspect agreement (Pearson r)",
    )


def _heatmap(
    names: list[str],
    grid: Any,
    *,
    cmap: str,
    limits: tuple[float, float],
    label: Callable[[int, int], str],
    fontsize: int,
    title: str,
) -> Figure:
    """A square model-by-model heatmap with a label in every cell that has a value, in a text
    colour readable on that cell."""
    import numpy as np

    size = 2.5 + 0.8 * len(names)
    fig = _figure(size + 1.5, size)
    ax = fig.add_subplot()
    image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=limits[0], vmax=limits[1])
    ax.set_xticks(range(len(names)), names, rotation=40, ha="right", fontsize=8)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    for i in range(len(names)):
        for j in range(len(names)):
            if not np.isnan(grid[i, j]):
                ax.text(
                    j,
                    i,
                    label(i, j),
                    ha="center",
                    va="center",
                    fontsize=fontsize,
                    color=_cell_text_colour(image, grid[i, j]),
                )
    ax.set_title(title)
    fig.colorbar(image, ax=ax, shrink=0.8)
    return fig


# HTML

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;
max-width:1200px;padding:0 1em;color:#222}
h1{font-size:1.5em}h2{font-size:1.15em;margin-top:1.8em}
table{border-collapse:collapse;font-size:.9em;margin:.5em 0}
th,td{padding:.3em .7em;border-bottom:1px solid #ddd}th{background:#f3f3f3;text-align:left}
td.r{text-align:right;font-variant-numeric:tabular-nums}td.l{text-align:left}
p.note{color:#555;font-size:.85em;margin:.2em 0}
figure{margin:1em 0}img{max-width:100%;height:auto;border:1px solid #eee}
p.banner{background:#ffd23f;color:#222;border:2px solid #b58900;padding:.7em 1em;
font-weight:600}
"""


def _simulated_banner(summary: Summary) -> str:
    """What a run on simulated engines must say first: its ratings are not real."""
    if not summary.simulated:
        return ""
    share = (
        "every record"
        if summary.simulated == summary.records
        else f"{summary.simulated} of {summary.records} records"
    )
    return (
        f"Simulated run: {share} came from simulated engines (backend = \"sim\"); the "
        "responses and ratings are made up, for trying the pipeline, not for comparing models."
    )


def render_html(summary: Summary, plots: dict[str, bytes], source: str) -> str:
    """One self-contained page: inline CSS, tables, plots as base64 data URIs, data escaped."""
    e = html.escape
    title = f"streamfeedback report: {source}"
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{e(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{e(title)}</h1>",
    ]
    banner = _simulated_banner(summary)
    if banner:
        parts.append(f'<p class=banner id=simulated role=alert>{e(banner)}</p>')
    if not plots:
        parts.append(f"<p class=note>No plots: matplotlib is not installed ({e(_EXTRA_HINT)}).</p>")
    for table in _tables(summary):
        parts.append(table.html())
        data = plots.get(table.plot or "")
        if data is not None:
            encoded = base64.b64encode(data).decode("ascii")
            label = e(f"{table.title} (plot)")
            parts.append(
                f'<figure><img alt="{label}" src="data:image/png;base64,{encoded}"></figure>'
            )
    parts.append("</body></html>\n")
    return "\n".join(parts)
