"""The method catalogue, built from the registry: ``recbench/conf/method/*.yaml`` (the methods), each
method's card ``methods/<name>.md`` (its header lines: paper, family, budget knob, reference) and
its settings dataclass (each setting's type, default and meaning). Nothing here is a second list
of methods: adding a method's module, config and card adds its catalogue entry.

References: docs/architecture.md section 3 ("Compression method").
"""
from __future__ import annotations

import dataclasses
import inspect
import re
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from recbench.conf import entry_point_dirs, targets
from recbench.runs.config import method_classes

#: the folder of the method cards: ``recbench/cards``, a link to ``methods/`` in a clone and a copy of it
#: in a wheel (package data)
CARDS_DIR = Path(__file__).resolve().parents[1] / "cards"
#: the card header lines the catalogue reads (``- **Paper**: ...``)
CARD_FIELDS = ("Paper", "Family", "Technique", "Budget knob", "Reference")
_HEADER = re.compile(r"^- \*\*(?P<key>[^*]+)\*\*: (?P<value>.*)$")
_FIELD_COMMENT = re.compile(r"^\s+(?P<name>\w+)\s*:[^=#]+=.*#:\s*(?P<help>.*)$")
_COMMENT_ABOVE = re.compile(r"^\s+#:\s*(?P<help>.*)$")
_FIELD = re.compile(r"^\s+(?P<name>\w+)\s*:")


@dataclass
class Setting:
    name: str
    type: str
    default: object
    meaning: str


@dataclass
class Entry:
    name: str
    title: str  # the card's first heading
    card: Dict[str, str]  # CARD_FIELDS present in the card's header
    settings: List[Setting]
    revision: int

    def field(self, key: str) -> str:
        return self.card.get(key, "")

    def short(self, key: str) -> str:
        """A header field's name part, without its explanation: ``table-backed``, ``weight sharing``."""
        return self.field(key).split(" (")[0].split(",")[0].rstrip(".").strip()


def techniques() -> Dict[str, str]:
    """{method: its compression technique} from the cards' ``Technique`` lines (the reports' colours);
    reads the configs and cards only (no method module is imported)."""
    extra = entry_point_dirs()
    out = {}
    for name in targets("method", extra):
        card = card_of(name, extra)
        value = card_header(card).get("Technique", "") if card.is_file() else ""
        if value:
            out[name] = Entry(name, "", {"Technique": value}, [], 1).short("Technique")
    return out


def card_of(name: str, extra_dirs: Sequence[str] = ()) -> Path:
    """The card of method ``name``: ``recbench/cards/<name>.md``, else beside its config in a package's
    config folder (``<folder>/method/<name>.md``); the first path when none exists."""
    candidates = (CARDS_DIR / f"{name}.md", *(Path(d) / "method" / f"{name}.md" for d in extra_dirs))
    return next((c for c in candidates if c.is_file()), candidates[0])


def card_header(path: Path) -> Dict[str, str]:
    """{key: value} of the ``- **Key**: value`` lines before the card's first section (a value
    continued on indented lines is joined)."""
    out: Dict[str, str] = {}
    key = None
    for line in path.read_text(encoding="utf-8").splitlines()[1:]:
        if line.startswith("## "):
            break
        match = _HEADER.match(line)
        if match:
            key = match["key"].strip()
            out[key] = match["value"].strip()
        elif key and line.startswith("  ") and line.strip():
            out[key] += " " + line.strip()
        else:
            key = None
    return out


def _meanings(settings_class: type) -> Dict[str, str]:
    """{field: its ``#:`` comment} over the settings class and its dataclass bases (a subclass's
    comment wins)."""
    out: Dict[str, str] = {}
    for klass in reversed(settings_class.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        above: List[str] = []
        for line in inspect.getsource(klass).splitlines():
            comment, field_line = _COMMENT_ABOVE.match(line), _FIELD_COMMENT.match(line)
            if comment:
                above.append(comment["help"].strip())
            elif field_line:
                out[field_line["name"]] = " ".join([*above, field_line["help"].strip()])
                above = []
            else:
                plain = _FIELD.match(line)
                if plain and above:
                    out[plain["name"]] = " ".join(above)
                above = []
    return out


def settings_list(method_class: type) -> List[Setting]:
    settings_class = method_class.settings_class
    hints = typing.get_type_hints(settings_class)
    meanings = _meanings(settings_class)
    out = []
    for f in dataclasses.fields(settings_class):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        kind = getattr(hints[f.name], "__name__", None) or str(hints[f.name]).replace("typing.", "")
        out.append(Setting(f.name, kind, default, meanings.get(f.name, "")))
    return out


def entries(names: Optional[List[str]] = None) -> List[Entry]:
    """The catalogue entries of ``names`` (default: every method in ``recbench/conf/method`` and in the
    config folders of installed packages' ``recbench.conf`` entry points, whose cards sit beside
    their configs: ``<folder>/method/<name>.md``)."""
    extra = entry_point_dirs()
    classes = method_classes(extra)
    unknown = sorted(set(names or ()) - set(classes))
    if unknown:
        raise KeyError(f"no method {', '.join(map(repr, unknown))}; allowed: {', '.join(sorted(classes))}")
    out = []
    for name in names or sorted(classes):
        card = card_of(name, extra)
        header = card_header(card) if card.is_file() else {}
        header.setdefault("Reference", header.get("Reference commit", ""))
        title = card.read_text(encoding="utf-8").splitlines()[0].lstrip("# ").strip() if card.is_file() else name
        out.append(Entry(name, title, {k: header[k] for k in CARD_FIELDS if header.get(k)},
                         settings_list(classes[name]), int(getattr(classes[name], "revision", 1))))
    return out
