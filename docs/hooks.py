"""MkDocs hook: render the Sphinx cross-reference roles found in flexsparse's docstrings.

The docstrings use ``:func:`name``` / ``:class:`~pkg.Name``` (readable in ``help()``); mkdocstrings
renders them as the literal role followed by inline code. This hook turns each into plain inline
code (``~`` keeps the last component only, as in Sphinx).
"""

from __future__ import annotations

import re

_ROLE = re.compile(r":(?:func|class|meth|mod|data|attr|obj|exc):<code>(~?)([\w.]+)</code>")


def _replace(match: re.Match) -> str:
    tilde, target = match.groups()
    return f"<code>{target.rsplit('.', 1)[-1] if tilde else target}</code>"


def on_page_content(html: str, **kwargs) -> str:
    return _ROLE.sub(_replace, html)
