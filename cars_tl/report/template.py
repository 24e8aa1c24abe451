"""The self-contained HTML page around the report's body: styles, and a script that sorts ``table.sortable``."""

from __future__ import annotations

from cars_tl.report.thumbnails import GALLERY_PX, THUMB_PX

_HTML = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>cars_tl report</title>
<link rel="icon" href="data:,">
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1400px; color: #222; padding: 0 1em; }}
nav {{ margin: 0 0 1em; font-size: 0.95em; }}
table {{ border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }}
th, td {{ border: 1px solid #ccc; padding: 4px 8px; text-align: right; }}
th {{ background: #f0f0f0; }}
td:first-child, th:first-child, td:nth-child(2), td:nth-child(3) {{ text-align: left; }}
tbody tr:nth-child(even) {{ background: #fafafa; }}
img {{ max-width: 100%; border: 1px solid #eee; }}
details {{ margin: 0.4em 0; }} summary {{ cursor: pointer; font-weight: 600; }}
.pair {{ display: flex; gap: 2em; flex-wrap: wrap; }} .pair h4 {{ margin: 0.5em 0 0; }}
table.sortable th {{ cursor: pointer; user-select: none; }} table.sortable th::after {{ content: " ⇅"; color: #999; }}
.pairs {{ display: flex; flex-wrap: wrap; gap: 1em; }}
figure.confusion {{ margin: 0.5em; padding: 0.5em; border: 1px solid #ddd; border-radius: 6px; width: 250px; text-align: center; }}
figure.confusion figcaption {{ font-size: 0.8em; margin-top: 0.3em; }}
.arrow {{ font-size: 1.5em; margin: 0 0.3em; vertical-align: middle; }}
img.thumb {{ width: {thumb}px; height: {thumb}px; object-fit: cover; vertical-align: middle; }}
.noimg {{ display: inline-block; width: {thumb}px; font-size: 0.7em; color: #777; vertical-align: middle; }}
.gallery {{ display: grid; grid-template-columns: repeat(auto-fill, minmax(400px, 1fr)); gap: 1em; }}
.card {{ border: 1px solid #ddd; border-radius: 6px; padding: 0.6em; }}
.card img.photo {{ width: {photo}px; height: auto; float: left; margin: 0 0.7em 0.3em 0; }}
.card .truth {{ font-weight: 600; margin-bottom: 0.3em; }}
table.preds {{ font-size: 0.78em; margin: 0; clear: both; width: 100%; }}
table.preds td {{ text-align: left; border: none; border-top: 1px solid #eee; padding: 2px 4px; }}
table.preds td.run {{ white-space: nowrap; color: #555; }}
tr.bad {{ background: #fff1f1 !important; }} .wrong {{ color: #c00; font-weight: bold; }} .right {{ color: #080; }}
.note {{ color: #a60; }}
</style></head><body>
{body}
<script>
document.querySelectorAll("table.sortable").forEach(function (table) {{
  table.querySelectorAll("th").forEach(function (th, column) {{
    th.addEventListener("click", function () {{
      var body = table.tBodies[0], rows = Array.from(body.rows);
      var ascending = th.dataset.order !== "asc";
      th.dataset.order = ascending ? "asc" : "desc";
      var value = function (row) {{ var t = row.cells[column].textContent.trim(), n = parseFloat(t.replace(/,/g, ""));
        return isNaN(n) ? t.toLowerCase() : n; }};
      rows.sort(function (a, b) {{ var x = value(a), y = value(b);
        if (typeof x !== typeof y) {{ x = String(x); y = String(y); }}
        return (x < y ? -1 : x > y ? 1 : 0) * (ascending ? 1 : -1); }});
      rows.forEach(function (row) {{ body.appendChild(row); }});
    }});
  }});
}});
</script>
</body></html>
""".replace("{thumb}", str(THUMB_PX)).replace("{photo}", str(GALLERY_PX))


def page(body: str) -> str:
    """The whole HTML document with ``body`` (HTML already made safe) inside."""
    return _HTML.format(body=body)
