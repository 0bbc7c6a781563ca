"""A self-contained HTML report, laid out to be scanned: per protocol the decision table ("which method
at which budget", its rule stated above it) first, then a table of contents with an anchor per budget, a
legend, the figures, and one sortable leaderboard table per budget; the rules and the report's
provenance close the page. Inline CSS and script, figures as base64 PNG, no network resource (links
to MLflow runs are plain anchors, loaded only when clicked).

Tables fit a 1400 px window: numbers never wrap, a command sits behind a ``<details>`` element and a
copy button, and a table wider than a narrow window scrolls inside its own box (``.wide``) with its
method column pinned; on a narrow window the figures keep a readable width and scroll in their box too. Text that
recbench writes with Markdown code spans (stage notes, rules, provenance) is shown with ``<code>``,
everything else escaped. Budgets read ``10x (ratio 0.1)`` (``fmt_budget``) everywhere.

References: docs/architecture.md section 1 (``reporting/``: HTML rendering); ``reporting.leaderboard``
(rules, formatting helpers).
"""
from __future__ import annotations

import base64
import html
import math
import re
from typing import Dict, List, Mapping, Optional, Sequence

from recbench.reporting.leaderboard import (
    BYTES, LATENCY, LOGLOSS, NE, RATIO, RECOMMENDATION_RULE, SPEED, TRAIN_BYTES, Row, bayes_ceiling, budgets, command, flagged,
    fmt, fmt_auc, fmt_budget, fmt_bytes, fmt_delta, fmt_latency, fmt_rank, fmt_vs_best, marked, recommend, reference,
    rules_text, run_url, under_budget_legend,
)
from recbench.reporting.plots import caption, figure_kind

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:1.5em 2em;color:#222;max-width:1500px}
h1{font-size:1.5em}h2{font-size:1.25em;margin-top:1.8em;border-bottom:1px solid #ccc}h3{font-size:1.05em;margin-top:1.5em}
a{color:#1a5fb4}p,li{line-height:1.45}
table{border-collapse:collapse;font-size:.82em;margin:.4em 0}th,td{border:1px solid #ddd;padding:3px 5px;text-align:right;
white-space:nowrap;vertical-align:top}th{background:#f3f3f3;white-space:normal;vertical-align:bottom}
td.l,th.l{text-align:left}td.w{white-space:normal;min-width:10em;max-width:24em}
tr.best td{background:#d9efd9}tr.near td{background:#eef7ee}tr.infeasible td,tr.failed td{color:#777}
tr.single td.seeds{color:#a04b00;font-weight:600}.badge{font-size:.8em;color:#a04b00;border:1px solid #e0b080;
border-radius:3px;padding:0 3px;margin-left:4px}
table.recommendation td.pick{font-weight:600}
th.sortable{cursor:pointer;user-select:none}th.sortable:after{content:" \\2195";color:#999}
th[aria-sort=ascending]:after{content:" \\2191";color:#222}th[aria-sort=descending]:after{content:" \\2193";color:#222}
code{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,"DejaVu Sans Mono",monospace;font-size:.9em;overflow-wrap:anywhere}
td.cmd details{display:inline-block;vertical-align:top}td.cmd summary{cursor:pointer;color:#1a5fb4}
td.cmd code{display:block;white-space:pre-wrap;overflow-wrap:anywhere;text-align:left;max-width:26em;margin-top:2px}
button.copy{font-size:.85em;padding:0 5px;margin-right:5px;cursor:pointer}
img{max-width:100%;height:auto;border:1px solid #eee;margin:.5em 0}.figs figure{margin:0 0 1em 0;min-width:0}
.wide{overflow-x:auto;max-width:100%}table.leaderboard{width:100%}.note{color:#555;font-size:.85em}.rule{margin:.3em 0}
nav.toc ul{margin:.2em 0;padding-left:1.3em}nav.toc li{margin:.2em 0}nav.toc .budgets a{margin-right:.9em;white-space:nowrap}
.legend span.key{display:inline-block;padding:0 6px;margin-right:.8em;border:1px solid #ddd}
.top{font-size:.8em;font-weight:normal;margin-left:.6em}
td{background:#fff}
@media (max-width:700px){body{margin:.8em}.figs figure{overflow-x:auto}.figs img{max-width:none;width:820px}
table.leaderboard td:nth-child(2),table.leaderboard th:nth-child(2),table.recommendation td:first-child,
table.recommendation th:first-child{position:sticky;left:0;z-index:1;box-shadow:1px 0 0 #ccc}}
"""

#: counts the figures that decoded, says whether the page fits its window's width and counts the tables
#: too wide for it (they scroll inside their own box), all read back from the DOM by the headless-browser test; sorts a
#: leaderboard by a clicked header (numbers by their ``data-sort`` value, empty last, rows without a
#: number in that column kept at the bottom); copies a command with the clipboard API (or a selection)
SCRIPT = r"""
window.addEventListener('load',function(){var n=0;for(var i=0;i<document.images.length;i++)
{var m=document.images[i];if(m.complete&&m.naturalWidth>0)n++;}
document.body.setAttribute('data-figures-rendered',String(n));
var d=document.documentElement;d.setAttribute('data-page-fits-width',String(d.scrollWidth<=d.clientWidth));
var w=document.querySelectorAll('.wide'),k=0;for(var j=0;j<w.length;j++){if(w[j].scrollWidth>w[j].clientWidth)k++;}
document.body.setAttribute('data-tables-scrolled',String(k));});
function rbKey(row,i){var c=row.cells[i];return c.hasAttribute('data-sort')?c.getAttribute('data-sort'):c.textContent.trim();}
function rbSort(th){var head=th.parentNode,i=Array.prototype.indexOf.call(head.children,th),n=head.children.length;
var body=th.closest('table').tBodies[0],rows=Array.prototype.slice.call(body.rows);
var asc=th.getAttribute('aria-sort')!=='ascending';
Array.prototype.forEach.call(head.children,function(x){x.removeAttribute('aria-sort');});
th.setAttribute('aria-sort',asc?'ascending':'descending');
var live=rows.filter(function(r){return r.cells.length===n;}),rest=rows.filter(function(r){return r.cells.length!==n;});
var numeric=live.every(function(r){var v=rbKey(r,i);return v===''||isFinite(Number(v));});
live.sort(function(a,b){var x=rbKey(a,i),y=rbKey(b,i);if(x===y)return 0;if(x==='')return 1;if(y==='')return -1;
var s=numeric?Number(x)-Number(y):x.localeCompare(y,undefined,{numeric:true});return asc?s:-s;});
live.concat(rest).forEach(function(r){body.appendChild(r);});}
document.addEventListener('click',function(e){var th=e.target.closest('th.sortable');if(th){rbSort(th);return;}
var b=e.target.closest('button.copy');if(!b)return;var t=b.getAttribute('data-copy');
function done(){b.textContent='copied';setTimeout(function(){b.textContent='copy';},1500);}
function fallback(){var a=document.createElement('textarea');a.value=t;document.body.appendChild(a);a.select();
try{document.execCommand('copy');done();}catch(x){}a.remove();}
if(navigator.clipboard&&window.isSecureContext){navigator.clipboard.writeText(t).then(done,fallback);}else{fallback();}});
document.addEventListener('keydown',function(e){var th=e.target.closest&&e.target.closest('th.sortable');
if(th&&(e.key==='Enter'||e.key===' ')){e.preventDefault();rbSort(th);}});
"""

_CODE_SPAN = re.compile(r"(`+)(.+?)\1", re.S)


def esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def inline(text: object) -> str:
    """recbench's own text with Markdown code spans (```code```) as ``<code>``; everything else escaped,
    so no backtick is ever shown literally around code."""
    out, last = [], 0
    text = str(text)
    for match in _CODE_SPAN.finditer(text):
        out.append(esc(text[last:match.start()]))
        out.append(f"<code>{esc(match.group(2).strip())}</code>")
        last = match.end()
    out.append(esc(text[last:]))
    return "".join(out)


def img(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img alt="{esc(alt)}" src="data:image/png;base64,{data}">'


def protocol_id(protocol: str) -> str:
    """The anchor of a protocol's section: ``synthetic-3a21043c37/03f852f4`` -> ``synthetic-3a21043c37-03f852f4``."""
    return re.sub(r"[^A-Za-z0-9]+", "-", protocol).strip("-").lower() or "protocol"


def budget_id(protocol: str, ratio: float) -> str:
    """The anchor of a budget's leaderboard: ``<protocol id>-ratio-0.1``."""
    return f"{protocol_id(protocol)}-ratio-{ratio:g}"


def _links(row: Row, ui_url: str) -> str:
    seeds = row.seed_list or ["?"] * len(row.run_ids)
    return " ".join(f'<a href="{esc(run_url(ui_url, e, i))}" title="MLflow run {esc(i)}">s{esc(s)}</a>'
                    for s, e, i in zip(seeds, row.experiment_ids, row.run_ids))


def _num(value: float, text: str) -> str:
    """A numeric cell: ``text`` shown, the raw number as its sort key (empty when unknown)."""
    key = "" if value is None or (isinstance(value, float) and math.isnan(value)) else repr(float(value))
    return f'<td data-sort="{key}">{esc(text)}</td>'


def _command(row: Row) -> str:
    cmd = esc(command(row))
    return (f'<td class="l cmd"><button type="button" class="copy" data-copy="{cmd}" title="copy the command">copy'
            f'</button><details><summary>show</summary><code>{cmd}</code></details></td>')


def _method(row: Row) -> str:
    badge = '<span class="badge" title="one seed: no std, not tested against the best">1 seed</span>' \
        if row.single_seed else ""
    title = f' title="{esc("; ".join(row.notes))}"' if row.notes else ""
    return f'<td class="l"{title}>{esc(marked(row))}{badge}</td>'


def _csv(labels: Sequence[str]) -> str:
    return esc(", ".join(labels)) or "—"


def recommendation_table(rows: Sequence[Row], protocol: str) -> str:
    """The decision table: per budget the recommended row (RECOMMENDATION_RULE), its numbers, the best
    mean when it is another row, the other rows ≈ best and the methods that cannot reach the budget."""
    head = ("budget", "recommended", "test AUC", "latency ms (batch 4096)", "inference bytes", "Δ AUC vs full",
            "best mean, if another", "also ≈ best", "infeasible")
    left = {"recommended", "best mean, if another", "also ≈ best", "infeasible"}
    out = ['<div class="wide"><table class="recommendation"><thead><tr>'
           + "".join(f'<th{" class=l" if h in left else ""}>{esc(h)}</th>' for h in head) + "</tr></thead><tbody>"]
    for rec in recommend(rows, protocol):
        pick, best = rec.pick, rec.best
        others = [r.label for r in rec.candidates if r is not pick and r is not best]
        link = f'<a href="#{esc(budget_id(protocol, rec.ratio))}">{esc(fmt_budget(rec.ratio))}</a>'
        if pick is None:
            cells = '<td class="l">—</td><td>—</td><td>—</td><td>—</td><td>—</td>'
        else:
            cells = (f'<td class="l pick">{esc(flagged(pick))}</td><td>{esc(fmt_auc(pick))}</td>'
                     f'<td>{esc(fmt_latency(pick))}</td><td>{esc(fmt_bytes(pick.mean.get(BYTES)))}</td>'
                     f'<td>{esc(fmt_delta(pick.delta_auc))}</td>')
        other = f"{esc(flagged(best))} {esc(fmt_auc(best))}" if best is not None and best is not pick else "—"
        out.append(f'<tr class="row"><td class="l">{link}</td>{cells}<td class="l">{other}</td>'
                   f'<td class="l w">{_csv(others)}</td><td class="l w">{_csv(rec.infeasible)}</td></tr>')
    out.append("</tbody></table></div>")
    return "\n".join(out)


#: the leaderboard's columns: (header, left-aligned)
LEADERBOARD_COLUMNS = (("rank", False), ("method", True), ("seeds", False), ("test AUC", False), ("vs best", False),
                       ("Δ AUC vs full", False), ("test log loss", False), ("test NE", False), ("inference bytes", False),
                       ("training bytes", False), ("achieved ratio", False), ("train samples/s", False), ("latency ms (batch 4096)", False),
                       ("Pareto", False), ("MLflow runs", True), ("command", True))


def _row_class(row: Row) -> str:
    if not row.finished:
        return f"row {row.status}"
    kind = "best" if row.best else "near" if row.near_best else "finished"
    return f"row {kind}" + (" single" if row.single_seed else "")


def _vs_best_key(row: Row) -> float:
    """Sort key of the ``vs best`` column: the best above every p-value, untested rows empty."""
    return 2.0 if row.best else row.p_best


def leaderboard_table(rows: Sequence[Row], protocol: str, ratio: float, ui_url: str) -> str:
    head = "".join(f'<th class="{"l " if left else ""}sortable" tabindex="0">{esc(name)}</th>' if name != "command"
                   else f'<th class="l">{esc(name)}</th>' for name, left in LEADERBOARD_COLUMNS)
    out = [f'<div class="wide"><table class="leaderboard" data-ratio="{ratio:g}"><thead><tr>{head}</tr></thead><tbody>']
    mine = [r for r in rows if r.protocol == protocol and r.ratio == ratio]
    for r in mine:
        if not r.finished:
            out.append(f'<tr class="{_row_class(r)}"><td>—</td><td class="l">{esc(r.label)}</td>'
                       '<td class="seeds">0</td>'
                       f'<td class="l w" colspan="{len(LEADERBOARD_COLUMNS) - 5}">{esc(r.status)}: {esc(r.reason[:300])}</td>'
                       f'<td class="l">{_links(r, ui_url)}</td>{_command(r)}</tr>')
            continue
        seeds_title = ' title="one seed: no std, not tested against the best"' if r.single_seed else ""
        out.append(
            f'<tr class="{_row_class(r)}"><td data-sort="{r.rank}">{fmt_rank(r)}</td>{_method(r)}'
            f'<td class="seeds"{seeds_title}>{r.seeds}</td>{_num(r.auc, fmt_auc(r))}'
            f'{_num(_vs_best_key(r), fmt_vs_best(r))}{_num(r.delta_auc, fmt_delta(r.delta_auc))}'
            f'{_num(r.mean.get(LOGLOSS, math.nan), fmt(r.mean.get(LOGLOSS), r.std.get(LOGLOSS)))}'
            f'{_num(r.mean.get(NE, math.nan), fmt(r.mean.get(NE), r.std.get(NE)))}'
            f'{_num(r.mean.get(BYTES, math.nan), fmt_bytes(r.mean.get(BYTES)))}'
            f'{_num(r.mean.get(TRAIN_BYTES, math.nan), fmt_bytes(r.mean.get(TRAIN_BYTES)))}'
            f'{_num(r.mean.get(RATIO, math.nan), format(r.mean.get(RATIO, math.nan), ".4g"))}'
            f'{_num(r.mean.get(SPEED, math.nan), format(r.mean.get(SPEED, math.nan), ",.0f"))}'
            f'{_num(r.mean.get(LATENCY, math.nan), fmt_latency(r))}'
            f'<td data-sort="{int(r.pareto)}">{"●" if r.pareto else ""}</td>'
            f'<td class="l">{_links(r, ui_url)}</td>{_command(r)}</tr>')
    out.append("</tbody></table></div>")
    noted = [r for r in mine if r.notes]
    under = [r for r in mine if r.finished and r.under_budget]
    if noted or under:
        items = "".join(f"<li>† {esc(r.label)}: {inline('; '.join(r.notes))}.</li>" for r in noted)
        items += "".join(f"<li>{esc(under_budget_legend(r))}</li>" for r in under)
        out.append(f'<ul class="note">{items}</ul>')
    return "\n".join(out)


def _reference_note(rows: Sequence[Row], protocol: str) -> str:
    ref, bayes = reference(rows, protocol), bayes_ceiling(rows, protocol)
    notes = []
    if ref is not None:
        notes.append(f"Reference <code>full</code> (ratio 1): test AUC {esc(fmt_auc(ref))}, "
                     f"{esc(fmt_bytes(ref.mean.get(BYTES)))} inference bytes, {ref.seeds} seed(s).")
    if bayes is not None:
        notes.append(f"Bayes-optimal test AUC (ceiling): {bayes:.4f}.")
    return f'<p class="note">{" ".join(notes)}</p>' if notes else ""


def contents(rows: Sequence[Row], protocols: Sequence[str]) -> str:
    """The table of contents: per protocol its figures and one link per budget; the rules and provenance."""
    items = []
    for protocol in protocols:
        pid = protocol_id(protocol)
        links = " ".join(f'<a href="#{esc(budget_id(protocol, x))}">{esc(fmt_budget(x))}</a>'
                         for x in budgets(rows, protocol))
        items.append(f'<li><a href="#{pid}">Protocol <code>{esc(protocol)}</code></a><ul>'
                     f'<li><a href="#{pid}-decision">Which method at which budget</a> · <a href="#{pid}-figures">'
                     f'Figures</a></li><li class="budgets">Leaderboards: {links}</li></ul></li>')
    items.append('<li><a href="#rules">Rules and legend</a> · <a href="#provenance">How this report was made</a></li>')
    return f'<nav class="toc" id="contents"><h2>Contents</h2><ul>{"".join(items)}</ul></nav>'


LEGEND = ('<p class="legend note"><span class="key" style="background:#d9efd9">best</span>'
          '<span class="key" style="background:#eef7ee">≈ best (not distinguishable)</span>'
          '<span class="key"><span class="badge">1 seed</span> single seed: no std, not tested</span>'
          '<span class="key">† caveat under the table</span><span class="key">↓ under budget</span>'
          '<span class="key">click a header to sort</span> <a href="#rules">all rules</a></p>')


def _provenance(generated: str) -> str:
    out = []
    for paragraph in (p.strip() for p in generated.split("\n\n") if p.strip()):
        lines = paragraph.splitlines()
        if all(line.startswith("- ") for line in lines):  # the provenance list
            out.append('<ul class="note">' + "".join(f"<li>{inline(line[2:])}</li>" for line in lines) + "</ul>")
        else:
            out.append(f'<p class="note">{inline(paragraph)}</p>')
    return "\n".join(out)


def render(title: str, sections: List[Dict[str, object]], rows: Sequence[Row], ui_url: str, generated: str,
           families: Optional[Mapping[str, str]] = None) -> str:
    """``sections``: one per protocol, {"protocol": id, "figures": {name: png bytes}}; ``families``: the
    {method: family} the figures were drawn with (their captions say so)."""
    protocols = [str(s["protocol"]) for s in sections]
    body = [f"<h1>{esc(title)}</h1>"]
    for protocol in protocols:
        pid = protocol_id(protocol)
        body.append(f'<h2 id="{pid}-decision">Which method at which budget: <code>{esc(protocol)}</code></h2>')
        body.append(_reference_note(rows, protocol))
        body.append(f'<p class="rule">{inline(RECOMMENDATION_RULE)}</p>')
        body.append(recommendation_table(rows, protocol))
    body.append(contents(rows, protocols))
    body.append(LEGEND)
    for section, protocol in zip(sections, protocols):
        pid = protocol_id(protocol)
        body.append(f'<h2 id="{pid}">Protocol <code>{esc(protocol)}</code></h2>')
        figures = section.get("figures") or {}
        if figures:
            body.append(f'<h3 id="{pid}-figures">Figures</h3>')
            body.append('<div class="figs">' + "".join(
                f'<figure class="{esc(figure_kind(name))}">{img(png, name)}<figcaption class="note">'
                f'<code>{esc(name)}</code>: {inline(caption(name, rows, protocol, families))}</figcaption></figure>'
                for name, png in figures.items()) + "</div>")
        else:
            body.append(f'<p class="note" id="{pid}-figures">No figures in this report (--no-figures).</p>')
        for ratio in budgets(rows, protocol):
            body.append(f'<h3 id="{esc(budget_id(protocol, ratio))}">Budget {esc(fmt_budget(ratio))}'
                        f'<a class="top" href="#contents">contents</a></h3>')
            body.append(leaderboard_table(rows, protocol, ratio, ui_url))
    body.append('<h2 id="rules">Rules and legend</h2>')
    body.append(f'<p class="note">{inline(rules_text(rows))}</p>')
    body.append(LEGEND.replace(' <a href="#rules">all rules</a>', ""))
    body.append(f'<p class="note">Links open the MLflow UI at {esc(ui_url)} (<code>make dashboard</code>). A command '
                f're-runs its jobs in a fresh store; in this one add <code>tracking.skip_finished=false</code>.</p>')
    body.append('<h2 id="provenance">How this report was made</h2>')
    body.append(_provenance(generated))
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{esc(title)}</title><style>{CSS}</style></head>\n<body>\n" + "\n".join(b for b in body if b)
            + f"\n<script>{SCRIPT}</script>\n</body></html>\n")
