"""``recbench-methods``: the method catalogue, read from the registry (configs, cards, settings).

    recbench-methods                 one line per method: family and budget knob
    recbench-methods qr pep          each method's card header and its settings (type, default, meaning)
    recbench-methods --markdown      the catalogue as a Markdown table

References: docs/architecture.md section 3; ``recbench.runs.catalogue``.
"""
from __future__ import annotations

import shutil
import sys
import textwrap
from typing import List

from recbench.cli import OneLineParser, refuse
from recbench.runs.catalogue import CARD_FIELDS, Entry, entries


def _short(text: str, width: int) -> str:
    text = text.replace("`", "")
    return text if len(text) <= width else text[: max(0, width - 1)] + "…"


def table(items: List[Entry]) -> str:
    width = shutil.get_terminal_size((120, 20)).columns
    name_w = max(len(e.name) for e in items)
    family_w = 14
    lines = [f"{'method':<{name_w}}  {'family':<{family_w}}  budget knob"]
    for e in items:
        family = e.field("Family").split(" (")[0].split(",")[0]
        knob = _short(e.field("Budget knob"), max(20, width - name_w - family_w - 4))
        lines.append(f"{e.name:<{name_w}}  {_short(family, family_w):<{family_w}}  {knob}")
    lines.append(f"\n{len(items)} methods. `recbench-methods NAME` shows one method's settings; "
                 "`recbench method=NAME method.<setting>=...` sets one.")
    return "\n".join(lines)


def markdown(items: List[Entry]) -> str:
    rows = ["| method | family | paper | budget knob |", "|---|---|---|---|"]
    for e in items:
        cells = [f"[{e.name}]({e.name}.md)", e.field("Family").split(" (")[0], e.field("Paper"), e.field("Budget knob")]
        rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(rows)


def describe(e: Entry) -> str:
    wrap = textwrap.TextWrapper(width=100, subsequent_indent="    ")
    out = [e.title, ""]
    out += [wrap.fill(f"{key}: {e.card[key]}") for key in CARD_FIELDS if key in e.card]
    out += [f"Revision: {e.revision}", f"Card: methods/{e.name}.md", ""]
    if not e.settings:
        out.append("Settings: none")
    else:
        out.append(f"Settings (recbench method={e.name} method.<setting>=<value>):")
        name_w = max(len(s.name) for s in e.settings)
        for s in e.settings:
            head = f"  {s.name:<{name_w}}  {s.type} = {s.default!r}"
            out.append(head)
            if s.meaning:
                out.append(textwrap.fill(s.meaning, width=100, initial_indent="      ", subsequent_indent="      "))
    return "\n".join(out)


def parser() -> OneLineParser:
    """The ``recbench-methods`` argument parser."""
    top = OneLineParser(prog="recbench-methods", description=__doc__.split("\n\n")[0].replace("``", ""),
                        epilog="examples: recbench-methods; recbench-methods qr pep; recbench-methods --markdown. "
                               "Exit status: 0 done; 2 an unknown method name")
    top.add_argument("names", nargs="*", metavar="name", help="methods to describe (default: the one-line catalogue)")
    top.add_argument("--markdown", action="store_true", help="print the catalogue as a Markdown table")
    return top


def main(argv: List[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        items = entries(args.names or None)
    except KeyError as exc:
        return refuse("recbench-methods", exc.args[0])
    if args.markdown:
        print(markdown(items))
    elif args.names:
        print("\n\n".join(describe(e) for e in items))
    else:
        print(table(items))
    return 0


if __name__ == "__main__":
    sys.exit(main())
