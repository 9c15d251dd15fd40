"""The explorer's self-contained HTML: plotly.js, the data (JSON) and the page's script all inline.

Nothing is loaded from the network: the page opens from a file, offline, or inline in a notebook
(in an ``<iframe srcdoc>``, so that the notebook's own scripts and the page's cannot meet).
"""

from __future__ import annotations

import base64
import html
import io
import json
from functools import lru_cache
from typing import Any

from .js_result import RESULT_JS
from .js_sweep import COMMON_JS, SWEEP_JS

MAX_IMAGE_SIDE = 768  # the embedded image is downscaled to this longest side (the maps are coarser anyway)

CSS = """
body{font:14px/1.4 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1d2433;background:#f6f7f9}
header{padding:12px 20px;background:#1d2433;color:#fff}
header h1{font-size:18px;margin:0 0 4px}
header .info{font-size:12px;opacity:.85}
header .info span{margin-right:14px}
main{display:grid;grid-template-columns:repeat(auto-fit,minmax(520px,1fr));gap:14px;padding:14px 20px}
section{background:#fff;border:1px solid #dde1e7;border-radius:6px;padding:10px 12px}
section.wide{grid-column:1/-1}
section h2{font-size:15px;margin:0 0 6px}
.controls{display:flex;flex-wrap:wrap;gap:6px 14px;align-items:center;font-size:13px;margin-bottom:4px}
.controls label{display:flex;gap:5px;align-items:center}
.caption{font-size:12px;color:#5a6372;margin:4px 0 0}
.plot{width:100%;min-height:360px}
#mp-status{font-size:13px;margin:0 20px;padding:6px 0;color:#1d2433}
.notes{font-size:12px;color:#8a4b00;margin:0 20px}
footer{font-size:11px;color:#5a6372;padding:4px 20px 14px}
"""

RESULT_BODY = """
<p id="mp-status" data-layer="" data-step="" data-quadrant=""></p>
<main>
<section><h2>Attention mass by quadrant (layer × step)</h2>
<div class="controls"><label>branch <select id="mp-branch"></select></label>
<span>click a cell to open that layer and step in the other views</span></div>
<div id="mp-quadrants" class="plot" style="height:560px"></div>
<p class="caption">Mass summed over each key group, averaged over query tokens, heads and the rows of the branch.</p>
</section>
<section id="mp-words-section"><h2>Image → word maps</h2>
<div class="controls" id="mp-word-controls"></div>
<div id="mp-wordmap" class="plot" style="height:520px"></div>
<p class="caption" id="mp-word-caption"></p>
</section>
<section><h2>Per head</h2>
<div class="controls"><label>quadrant <select id="mp-head-quadrant"></select></label>
<label>step <select id="mp-head-step"></select></label></div>
<div id="mp-heads" class="plot" style="height:420px"></div>
</section>
<section id="mp-groups-section"><h2>Text key groups (image queries)</h2>
<div class="controls"><label>step <select id="mp-group-step"></select></label>
<label><input type="checkbox" id="mp-group-norm" checked> fraction of the text attention</label></div>
<div id="mp-groups" class="plot" style="height:420px"></div>
</section>
</main>
"""

SWEEP_BODY = """
<main>
<section class="wide"><h2>Effect of each ablation</h2>
<div class="controls"><label>metric <select id="mp-metric"></select></label><span id="mp-spread"></span></div>
<div id="mp-effect" class="plot" style="height:460px"></div>
<p class="caption">Bars: mean over seeds and prompts; error bars: ± s.d. (clipped to the metric's range); dots: single
runs. Click a bar to pick out its ablations in the per-step curves.</p>
</section>
<section class="wide" id="mp-steps-section"><h2>Effect by denoising step</h2>
<div class="controls"><label>metric <select id="mp-step-metric"></select></label></div>
<div id="mp-step-effect" class="plot" style="height:460px"></div>
</section>
</main>
"""


@lru_cache(maxsize=1)
def plotly_js() -> str:
    """plotly.js, minified, from the ``plotly`` Python package (no network)."""
    try:
        from plotly.offline import get_plotlyjs
    except ImportError as err:
        raise ImportError("the explorer needs plotly (its bundled plotly.js draws the page): pip install plotly") from err
    return get_plotlyjs()


def image_source(image: Any) -> dict:
    """PIL image / array / path → ``{"src": PNG data URI, "width", "height"}`` (longest side ≤ ``MAX_IMAGE_SIDE``)."""
    from PIL import Image

    if isinstance(image, (str, bytes)) or hasattr(image, "__fspath__"):
        image = Image.open(image)
    elif not hasattr(image, "convert"):
        import numpy as np

        arr = np.asarray(image.detach().cpu() if hasattr(image, "detach") else image, dtype=np.float32)
        if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[-1] not in (1, 3, 4):
            arr = arr.transpose(1, 2, 0)
        arr = arr * 255.0 if arr.max() <= 1.0 else arr
        image = Image.fromarray(arr.clip(0, 255).astype("uint8").squeeze())
    image = image.convert("RGB")
    if max(image.size) > MAX_IMAGE_SIDE:
        image = image.copy()
        image.thumbnail((MAX_IMAGE_SIDE, MAX_IMAGE_SIDE))
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=True)
    return {"src": "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii"),
            "width": image.size[0], "height": image.size[1]}


def data_json(data: dict) -> str:
    """JSON safe inside ``<script>``: no ``</`` or ``<!--`` can end or confuse the element."""
    text = json.dumps(data, separators=(",", ":"), allow_nan=False, ensure_ascii=False)
    return text.replace("</", "<\\/").replace("<!--", "<\\u0021--")


def render(data: dict, title: str, subtitle: str = "") -> str:
    """The whole page for ``data`` (``data["kind"]``: ``"result"`` or ``"sweep"``)."""
    body, script = (RESULT_BODY, RESULT_JS) if data["kind"] == "result" else (SWEEP_BODY, SWEEP_JS)
    info = "".join(f"<span><b>{html.escape(str(k))}</b> {html.escape(str(v))}</span>"
                   for k, v in data.get("info", {}).items() if v not in (None, ""))
    notes = "".join(f"<p class='notes'>{html.escape(n)}</p>" for n in data.get("notes", []))
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\n"
        f"<meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">\n<title>{html.escape(title)}</title>\n"
        f"<style>{CSS}</style>\n<script>{plotly_js()}</script>\n</head><body>\n"
        f"<header><h1>{html.escape(title)}</h1><div class=\"info\">{info}</div></header>\n{notes}{body}"
        f"<footer>{html.escape(subtitle)}</footer>\n"
        f"<script type=\"application/json\" id=\"mp-data\">{data_json(data)}</script>\n"
        f"<script>\n{COMMON_JS}\n{script}\n</script>\n</body></html>\n"
    )


def iframe(page: str, height: int = 1500) -> str:
    """The page inline in a notebook: an iframe whose ``srcdoc`` is the page."""
    return (f'<iframe srcdoc="{html.escape(page, quote=True)}" style="width:100%;height:{height}px;border:0" '
            'title="mmdit_probe explorer"></iframe>')
