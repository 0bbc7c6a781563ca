"""A self-contained HTML report: tables and figures (PNG embedded as base64), inline CSS, no
network resource (links to MLflow runs are plain anchors, loaded only when clicked).

References: docs/architecture.md section 1 (``reporting/``: HTML rendering).
"""
from __future__ import annotations

import base64
import html
import math
from typing import Dict, List, Sequence

from recbench.reporting.leaderboard import (
    AUC, BYTES, LATENCY, LOGLOSS, RATIO, SPEED, Row, bayes_ceiling, budgets, command, flagged, fmt, fmt_bytes,
    fmt_delta, fmt_rank, marked, recommend, reference, rules_text, run_url, under_budget_legend,
)
from recbench.reporting.plots import caption, figure_kind

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em;color:#222;max-width:1500px}
h1{font-size:1.5em}h2{font-size:1.25em;margin-top:2em;border-bottom:1px solid #ccc}h3{font-size:1.05em;margin-top:1.5em}
table{border-collapse:collapse;font-size:.85em;margin:.5em 0}th,td{border:1px solid #ddd;padding:3px 7px;text-align:right}
th{background:#f3f3f3}td.l,th.l{text-align:left}tr.best td{background:#eef7ee}tr.tie td{background:#f6fbf6}
tr.infeasible td,tr.failed td{color:#888}code{font-size:.85em;white-space:nowrap}
img{max-width:100%;border:1px solid #eee;margin:.5em 0}.figs{display:flex;flex-wrap:wrap;gap:1em}
.wide{overflow-x:auto}.figs figure{margin:0;flex:1 1 600px}.figs figure.budgets{flex-basis:100%}.note{color:#555;font-size:.85em}
"""

#: counts the figures that decoded and says whether the page fits its window's width (wide tables
#: scroll inside their own box), both read back from the DOM by the headless-browser test
SCRIPT = ("window.addEventListener('load',function(){var n=0;for(var i=0;i<document.images.length;i++)"
          "{var m=document.images[i];if(m.complete&&m.naturalWidth>0)n++;}"
          "document.body.setAttribute('data-figures-rendered',String(n));"
          "var d=document.documentElement;d.setAttribute('data-page-fits-width',String(d.scrollWidth<=d.clientWidth));});")


def esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def img(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img alt="{esc(alt)}" src="data:image/png;base64,{data}">'


def _links(row: Row, ui_url: str) -> str:
    seeds = row.seed_list or ["?"] * len(row.run_ids)
    return " ".join(f'<a href="{esc(run_url(ui_url, e, i))}" title="MLflow run {esc(i)}">s{esc(s)}</a>'
                    for s, e, i in zip(seeds, row.experiment_ids, row.run_ids))


def recommendation_table(rows: Sequence[Row], protocol: str) -> str:
    out = ['<div class="wide"><table class="recommendation"><thead><tr><th>budget (ratio)</th><th class="l">recommended</th>'
           '<th>test AUC</th><th>Δ AUC vs full</th><th>inference bytes</th><th class="l">tied (within 2 std)</th>'
           '<th class="l">infeasible</th></tr></thead><tbody>']
    for rec in recommend(rows, protocol):
        b = rec.best
        out.append(f'<tr class="row"><td>{rec.ratio:g}</td><td class="l">{esc(flagged(b)) if b else "—"}</td>'
                   f'<td>{fmt(b.auc, b.std.get(AUC)) if b else "—"}</td><td>{fmt_delta(b.delta_auc) if b else "—"}</td>'
                   f'<td>{fmt_bytes(b.mean.get(BYTES)) if b else "—"}</td>'
                   f'<td class="l">{esc(", ".join(r.label for r in rec.tied) or "—")}</td>'
                   f'<td class="l">{esc(", ".join(rec.infeasible) or "—")}</td></tr>')
    out.append("</tbody></table></div>")
    return "\n".join(out)


def leaderboard_table(rows: Sequence[Row], protocol: str, ratio: float, ui_url: str) -> str:
    out = [f'<div class="wide"><table class="leaderboard" data-ratio="{ratio:g}"><thead><tr><th>rank</th><th class="l">method</th>'
           '<th>seeds</th><th>test AUC</th><th>Δ AUC vs full</th><th>test log loss</th><th>inference bytes</th>'
           '<th>achieved ratio</th><th>train samples/s</th><th>latency ms (4096)</th><th>Pareto</th>'
           '<th class="l">MLflow runs</th><th class="l">command</th></tr></thead><tbody>']
    for r in (r for r in rows if r.protocol == protocol and r.ratio == ratio):
        cls = "row " + (r.status if not r.finished else ("best" if r.rank == 1 else "tie" if r.tied else "finished"))
        cmd = f'<code>{esc(command(r))}</code>'
        if not r.finished:
            out.append(f'<tr class="{cls}"><td>—</td><td class="l">{esc(r.label)}</td><td>0</td>'
                       f'<td class="l" colspan="8">{esc(r.status)}: {esc(r.reason[:300])}</td>'
                       f'<td class="l">{_links(r, ui_url)}</td><td class="l">{cmd}</td></tr>')
            continue
        out.append(
            f'<tr class="{cls}"><td>{fmt_rank(r)}</td><td class="l" title="{esc("; ".join(r.notes))}">{esc(marked(r))}</td><td>{r.seeds}</td>'
            f'<td>{fmt(r.auc, r.std.get(AUC))}</td><td>{fmt_delta(r.delta_auc)}</td>'
            f'<td>{fmt(r.mean.get(LOGLOSS), r.std.get(LOGLOSS))}</td><td>{fmt_bytes(r.mean.get(BYTES))}</td>'
            f'<td>{r.mean.get(RATIO, math.nan):.4g}</td><td>{r.mean.get(SPEED, math.nan):,.0f}</td>'
            f'<td>{r.mean.get(LATENCY, math.nan):.2f}</td><td>{"●" if r.pareto else ""}</td>'
            f'<td class="l">{_links(r, ui_url)}</td><td class="l">{cmd}</td></tr>')
    out.append("</tbody></table></div>")
    noted = [r for r in rows if r.protocol == protocol and r.ratio == ratio and r.notes]
    under = [r for r in rows if r.protocol == protocol and r.ratio == ratio and r.finished and r.under_budget]
    if noted or under:
        items = "".join(f"<li>† {esc(r.label)}: {esc('; '.join(r.notes))}.</li>" for r in noted)
        items += "".join(f"<li>{esc(under_budget_legend(r))}</li>" for r in under)
        out.append(f'<ul class="note">{items}</ul>')
    return "\n".join(out)


def render(title: str, sections: List[Dict[str, object]], rows: Sequence[Row], ui_url: str, generated: str) -> str:
    """``sections``: one per protocol, {"protocol": id, "figures": {name: png bytes}}."""
    paragraphs = [p.strip() for p in generated.split("\n\n") if p.strip()]
    body = [f"<h1>{esc(title)}</h1>"]
    for paragraph in paragraphs:  # plain text, or a "- item" list (provenance)
        lines = paragraph.splitlines()
        if all(line.startswith("- ") for line in lines):
            items = "".join(f"<li>{esc(line[2:])}</li>" for line in lines)
            body.append(f'<ul class="note">{items}</ul>')
        else:
            body.append(f'<p class="note">{esc(paragraph)}</p>')
    for section in sections:
        protocol = str(section["protocol"])
        body.append(f'<h2 id="{esc(protocol)}">Protocol <code>{esc(protocol)}</code></h2>')
        ref, bayes = reference(rows, protocol), bayes_ceiling(rows, protocol)
        notes = []
        if ref is not None:
            notes.append(f"Reference <code>full</code> (ratio 1): test AUC {fmt(ref.auc, ref.std.get(AUC))}, "
                         f"{fmt_bytes(ref.mean.get(BYTES))} inference bytes, {ref.seeds} seed(s).")
        if bayes is not None:
            notes.append(f"Bayes-optimal test AUC (ceiling): {bayes:.4f}.")
        body.append("<p>" + " ".join(notes) + "</p>")
        figures = section.get("figures") or {}
        body.append('<div class="figs">' + "".join(
            f'<figure class="{esc(figure_kind(name))}">{img(png, name)}'
            f'<figcaption class="note"><code>{esc(name)}</code>: {esc(caption(name))}</figcaption></figure>'
            for name, png in figures.items()) + "</div>")
        body.append("<h3>Which method at which budget</h3>")
        body.append(recommendation_table(rows, protocol))
        for ratio in budgets(rows, protocol):
            body.append(f"<h3>Budget: compression ratio {ratio:g}</h3>")
            body.append(leaderboard_table(rows, protocol, ratio, ui_url))
    body.append(f'<p class="note">Rules: {esc(rules_text(rows))} Links open the MLflow UI at {esc(ui_url)} '
                f'(<code>make dashboard</code>). A command re-runs its jobs in a fresh store; in this one add '
                f'<code>tracking.skip_finished=false</code>.</p>')
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{esc(title)}</title><style>{CSS}</style></head>\n<body>\n" + "\n".join(body)
            + f"\n<script>{SCRIPT}</script>\n</body></html>\n")
