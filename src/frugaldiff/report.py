"""``frugaldiff report RUN_DIR``: one self-contained HTML page of a run (plots embedded, no network)."""

from __future__ import annotations

import base64
import html
import json
import tempfile
from pathlib import Path
from typing import Any

from .checkpoint import atomic_write_text, checkpoint_info, damage, intact_checkpoints
from .components import build_data
from .config import Config
from .errors import FrugalError
from .generate import sample, save_samples
from .plots import plot_eval, plot_ledger, plot_metrics
from .runs import METRIC_FIELDS, RunFiles, read_metrics, read_run_config

SECTIONS = ("Config", "Training curves", "Loss ledger", "Samples over training", "Metrics", "Analyses")


def _image(png: Path, caption: str = "", css: str = "") -> str:
    data = base64.b64encode(png.read_bytes()).decode("ascii")
    figure = f'<img class="{css}" src="data:image/png;base64,{data}" alt="{html.escape(png.name)}">'
    return f"<figure>{figure}<figcaption>{html.escape(caption)}</figcaption></figure>" if caption else figure


def _note(text: str) -> str:
    return f'<p class="note">{html.escape(text)}</p>'


def _table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(r.get(c, '')))}</td>" for c in columns) + "</tr>"
                   for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _scalars(result: dict[str, Any]) -> dict[str, Any]:
    """The top-level numbers and strings of an analysis result (its summary)."""
    return {k: v for k, v in result.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)}


def _samples_section(run_dir: Path, config: Config, scratch: Path, n: int, steps: int | None) -> str:
    """A sample grid of every kept checkpoint, then of every post-hoc EMA `frugaldiff ema` wrote."""
    checkpoints = intact_checkpoints(run_dir)
    if not checkpoints:
        return _note("no checkpoint yet")
    posthoc = sorted(p for p in (run_dir / "posthoc").glob("sigma-*") if p.is_dir() and damage(p) is None)
    image = checkpoint_info(checkpoints[0])["data_kind"] == "image"
    reference = None if image else build_data(config).heldout.numpy()  # vector samples are drawn over it
    figures = []
    for checkpoint in [*checkpoints, *posthoc]:
        info = checkpoint_info(checkpoint)
        samples = sample(run_dir, n=n, steps=steps, checkpoint=checkpoint)
        png = scratch / f"samples-{checkpoint.parent.name}-{checkpoint.name}.png"
        save_samples(samples, png, reference)
        css = "samples" if image else ""
        ema = f"post-hoc EMA σ_rel = {info['posthoc']['sigma_rel']}" if "posthoc" in info else "EMA"
        figures.append(_image(png, f"{info['images_seen']} images seen ({ema}, seed {config['sample.seed']})", css))
    return '<div class="row">' + "".join(figures) + "</div>"


def _metrics_section(rows: list[dict[str, str]]) -> str:
    if not rows:
        return _note("no rows of metrics.csv to show")
    last = rows[-1]
    parts = [_table([last], METRIC_FIELDS)]
    evaluated = [c for c in rows[0] if c.startswith("eval_")]
    for column in evaluated:
        points = [{"images_seen": r["images_seen"], column: r[column]} for r in rows if r.get(column)]
        parts.append(f"<h3>{html.escape(column)} during training</h3>" + _table(points, ["images_seen", column]))
    if not evaluated:
        parts.append(_note("no evaluation during training (train.eval_every = 0); score samples with "
                           "`frugaldiff sample` and `frugaldiff eval`"))
    return "".join(parts)


def _analyses_section(run_dir: Path) -> str:
    # analyze ledger's plots are the Loss ledger section already
    folders = sorted(p for p in (run_dir / "analysis").glob("*") if p.is_dir() and p.name != "ledger")
    if not folders:
        return _note("no analysis run yet: frugaldiff analyze disruption|importance|ledger RUN_DIR")
    parts = []
    for folder in folders:
        parts.append(f"<h3>{html.escape(folder.name)}</h3>")
        for result in sorted(folder.glob("*.json")):
            try:
                summary = _scalars(json.loads(result.read_text(encoding="utf-8")))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
                parts.append(_note(f"{result.name} cannot be read ({type(e).__name__}); rerun the analysis"))
                continue
            parts.append(_table([summary], list(summary)) if summary else "")
        parts.append('<div class="row">' + "".join(_image(p, p.name) for p in sorted(folder.glob("*.png"))) + "</div>")
    return "".join(parts)


STYLE = """body{font-family:sans-serif;max-width:1200px;margin:2em auto;color:#222}
img{max-width:100%}figure{display:inline-block;margin:0.5em}figcaption{font-size:0.85em;color:#555}
.row{display:flex;flex-wrap:wrap;align-items:flex-start}table{border-collapse:collapse;font-size:0.85em;margin:0.5em 0}
td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}pre{background:#f6f6f6;padding:1em;overflow:auto}
.note{color:#777;font-style:italic}img.samples{width:240px;image-rendering:pixelated}"""


def render_report(run_dir: str | Path, out: str | Path | None = None, n: int = 16, steps: int | None = None) -> Path:
    """Write ``out`` (default RUN_DIR/report.html): the run's config, training curves, loss ledger, a sample
    grid from every kept checkpoint, the metrics and every analysis under RUN_DIR/analysis."""
    run_dir = Path(run_dir)
    files = RunFiles(run_dir)
    config = read_run_config(run_dir)  # a one-line error unless RUN_DIR is a run folder
    try:
        rows, missing = (read_metrics(files.metrics), "metrics.csv has no rows yet") if files.metrics.is_file() else \
            ([], "no metrics.csv yet")
    except FrugalError as e:  # the rest of the report still renders
        rows, missing = [], str(e)
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        curves = []
        if rows:
            plot_metrics(files.metrics, scratch / "loss.png")
            curves.append(_image(scratch / "loss.png"))
            for column in (c for c in rows[0] if c.startswith("eval_")):
                plot_eval(files.metrics, column, scratch / f"{column}.png")
                if (scratch / f"{column}.png").is_file():
                    curves.append(_image(scratch / f"{column}.png"))
        ledger = plot_ledger(files.metrics, scratch / "ledger") if rows else []
        body = {
            "Config": f"<details><summary>config.toml (every key)</summary><pre>{html.escape(files.config.read_text())}"
                      "</pre></details>",
            "Training curves": '<div class="row">' + "".join(curves) + "</div>" if curves else _note(missing),
            "Loss ledger": "".join(_image(p) for p in ledger) or _note("no per-bin columns in metrics.csv"),
            "Samples over training": _samples_section(run_dir, config, scratch, n, steps),
            "Metrics": _metrics_section(rows),
            "Analyses": _analyses_section(run_dir),
        }
    sections = "".join(f'<section id="{name.lower().replace(" ", "-")}"><h2>{name}</h2>{body[name]}</section>'
                       for name in SECTIONS)
    page = (f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>frugaldiff report: {html.escape(run_dir.name)}'
            f"</title><style>{STYLE}</style></head><body><h1>frugaldiff run {html.escape(str(run_dir))}</h1>"
            f"{sections}</body></html>\n")
    target = Path(out) if out is not None else run_dir / "report.html"
    atomic_write_text(target, page)
    return target
