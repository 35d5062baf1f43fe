"""MkDocs hook: the site's formulas as MathML, made at build time.

pymdownx.arithmatex (generic mode) leaves ``\\(...\\)`` and ``\\[...\\]`` in
``<span|div class="arithmatex">``; this hook turns each into MathML with latex2mathml, which
browsers render natively: no JavaScript, no CDN, so the pages read the same offline.
"""

from __future__ import annotations

import html
import re

from latex2mathml.converter import convert

_MATH = re.compile(r'<(span|div) class="arithmatex">\s*\\([(\[])(.*?)\\[)\]]\s*</\1>', re.S)


def _mathml(match: re.Match) -> str:
    tag, opening, tex = match[1], match[2], html.unescape(match[3])
    display = "block" if opening == "[" else "inline"
    return f'<{tag} class="arithmatex">{convert(tex.strip(), display=display)}</{tag}>'


def on_page_content(content: str, **kwargs) -> str:
    return _MATH.sub(_mathml, content)
