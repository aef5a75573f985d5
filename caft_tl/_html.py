"""The one HTML page shell under every report the package writes (demo, diagnostics,
directions, crosscoder figures): a self-contained file, so it opens offline."""

from __future__ import annotations

import html

REPORT_CSS = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.6em} h2{margin-top:2em;border-bottom:1px solid #ddd}
.tbl{border-collapse:collapse;font-size:.9em}
.tbl td,.tbl th{padding:3px 8px;border-bottom:1px solid #eee;text-align:right}
.note{background:#fff8e1;border-left:4px solid #f0b400;padding:.6em 1em}
pre{background:#f6f6f6;padding:.6em;overflow-x:auto;font-size:.8em}
"""


def plotly_script() -> str:
    """plotly.js inlined in a ``<script>`` (about 3.5 MB), so figures render without a CDN."""
    import plotly.offline

    return f"<script>{plotly.offline.get_plotlyjs()}</script>"


def document(title: str, body: str, *, css: str = REPORT_CSS, head: str = "") -> str:
    """A whole HTML document: ``title`` (escaped here), ``css`` in a ``<style>``, extra
    ``head`` markup (e.g. :func:`plotly_script`), and ``body`` as given (already HTML)."""
    return (
        f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{css}</style>{head}</head><body>\n{body}\n</body></html>\n"
    )
