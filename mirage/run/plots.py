"""Plots that need no network: DVC's page with its JavaScript inside, and the PR curves as a picture.

`dvc plots show` and `dvc plots diff` write an index.html whose curves load
vega, vega-lite and vega-embed from a CDN: on a machine without internet only
the images render.  The project's `.dvc/config` points DVC at
`.dvc/plots/offline.html` (`plots.html_template`), a page holding those
libraries itself, bundled by the `vl-convert-python` package; this module
writes it (`python -m mirage.run.plots`; a test checks the committed file is
what the package makes).  `pr_png` draws the PR curves of every
self-training round for the dashboard's summary.
"""
from __future__ import annotations

import csv
import io
import sys
from pathlib import Path

TEMPLATE = Path(".dvc") / "plots" / "offline.html"  # plots.html_template in .dvc/config (relative to .dvc/)


def template_html() -> str:
    """DVC's page layout with vega, vega-lite and vega-embed inlined (no {scripts}: no CDN tag)."""
    import vl_convert

    bundle = vl_convert.javascript_bundle().replace("</script", "<\\/script")
    versions = f"vega {vl_convert.get_vega_version()}, vega-embed {vl_convert.get_vega_embed_version()}"
    return ("<!DOCTYPE html>\n<html>\n<head>\n    {refresh_tag}\n    <title>DVC Plot</title>\n"
            f"    <!-- {versions}, bundled by vl-convert-python: no network needed -->\n"
            f"    <script>{bundle}</script>\n"
            "    <style>\n        table {\n            border-spacing: 15px;\n        }\n    </style>\n"
            "</head>\n<body>\n    {plot_divs}\n</body>\n</html>\n")


def write_template(root: str | Path = ".") -> Path:
    path = Path(root) / TEMPLATE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(template_html())
    return path


def pr_png(pr_dir: str | Path) -> bytes | None:
    """Precision against recall, one line per self-training round (plots/pr/round-K.csv)."""
    from PIL import Image, ImageDraw, ImageFont

    files = sorted(Path(pr_dir).glob("round-*.csv"), key=lambda p: int(p.stem.split("-")[1]))
    if not files:
        return None
    font = ImageFont.load_default(size=12)
    width, height, left, top, plot = 560, 420, 56, 28, 340
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    draw.rectangle((left, top, left + plot, top + plot), outline=(180, 180, 180))
    for k in range(6):
        v = k / 5
        x, y = left + plot * v, top + plot - plot * v
        draw.text((x - 8, top + plot + 6), f"{v:.1f}", fill=(90, 90, 90), font=font)
        draw.text((left - 30, y - 7), f"{v:.1f}", fill=(90, 90, 90), font=font)
    draw.text((left + plot // 2 - 20, height - 22), "recall", fill=(40, 40, 40), font=font)
    draw.text((4, top - 20), "precision (test split, class-agnostic)", fill=(40, 40, 40), font=font)
    palette = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189)]
    for i, path in enumerate(files):
        with path.open() as f:
            rows = [(float(r["recall"]), float(r["precision"])) for r in csv.DictReader(f)]
        color = palette[i % len(palette)]
        points = [(left + plot * r, top + plot - plot * p) for r, p in rows]
        if len(points) > 1:
            draw.line(points, fill=color, width=2)
        draw.text((left + plot + 14, top + 8 + 18 * i), f"round {path.stem.split('-')[1]}", fill=color, font=font)
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


if __name__ == "__main__":
    print(write_template(sys.argv[1] if len(sys.argv) > 1 else "."))
