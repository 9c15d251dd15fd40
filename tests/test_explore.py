"""The explorer (mmdit_probe.explorer, `mmdit-probe explore`): self-contained pages holding their views' data, budget,
CLI; in headless Chromium (skipped, saying why, where none runs): offline, no console errors, controls redraw."""

from __future__ import annotations

import base64
import html as html_lib
import json
import os
import re
import shutil
from contextlib import contextmanager

import numpy as np
import pandas as pd
import pytest
import torch

import mmdit_probe as mp
from mmdit_probe.cli import SUBCOMMANDS, main
from mmdit_probe.cli import explore as explore_cli
from mmdit_probe.explorer import DEFAULT_MAX_BYTES, ExploreBudgetError, Explorer, explore

PROMPT = "a red circle left of a blue square"
RUN = dict(num_inference_steps=3, height=32, width=40, max_sequence_length=12)


def record(pipe, msl: int = 12, **options):
    with mp.AttentionRecorder(pipe, words=True, groups=True, **options) as rec:
        img = pipe(PROMPT, **{**RUN, "max_sequence_length": msl}, generator=torch.manual_seed(0)).images[0]
    return rec.result, img


@pytest.fixture(scope="module")
def sd3():
    return record(mp.tiny_sd3_pipeline())


@pytest.fixture(scope="module")
def flux():
    return record(mp.tiny_flux_pipeline(), 16)


@pytest.fixture(scope="module")
def sweep_csv(tmp_path_factory):
    pipe, path = mp.tiny_sd3_pipeline(), tmp_path_factory.mktemp("sweep") / "sweep.csv"
    mp.sweep(pipe, "a red circle", mp.skip_each_layer(pipe), seeds=[0, 1], save_to=path, progress=False,
             **{**RUN, "num_inference_steps": 2})
    return path


def knock_out_table() -> pd.DataFrame:  # as mp.sweep writes it for knock_out_each_quadrant (values made up)
    rng = np.random.default_rng(0)
    return pd.DataFrame([dict(prompt="p", seed=seed, spec=f"knock out {q} in block {layer}", spec_index=4 * layer + i,
                              metric=metric, step=step, value=rng.uniform(0, 1e-3))
                         for layer in range(3) for i, q in enumerate(mp.QUADRANTS) for seed in (0, 1, 2)
                         for metric, step in (("image_mse", None), ("velocity_mse", 0), ("velocity_mse", 1))])


def page_data(page: str) -> dict:
    return json.loads(re.search(r'<script type="application/json" id="mp-data">(.*?)</script>', page, re.S).group(1))


def decode(word_maps: dict, branch: str, word: str, layer_opt: int, step_opt: int, head_opt: int = 0) -> np.ndarray:
    """One carried word map as floats (NaN: missing), decoded as the page's script decodes it."""
    h, w = word_maps["grid"]
    entry = word_maps["maps"][branch][word]
    k = (layer_opt * (len(word_maps["steps"]) + 1) + step_opt) * (len(word_maps["heads"]) + 1) + head_opt
    raw = np.frombuffer(base64.b64decode(entry["b64"]), dtype=np.uint8)[k * h * w:(k + 1) * h * w].astype(float)
    return np.where(raw == 255, np.nan, raw / 254 * entry["scale"][k]).reshape(h, w)


def close(got, want) -> None:
    """Equal up to the 8-bit quantisation of the word maps (NaN where missing)."""
    want = np.asarray(want, dtype=float)
    np.testing.assert_allclose(got, want, atol=(np.nanmax(want) if np.isfinite(want).any() else 0) / 254 + 1e-7)


def test_page_is_self_contained_and_holds_the_views_data(sd3, flux):
    res, img = sd3
    assert res.branches == ("uncond", "cond")  # batch row 1 is cond in these tests
    page = explore(res, image=img).html
    assert page.startswith("<!DOCTYPE html>") and "plotly.js v" in page
    tags = re.findall(r"<(?:script|link|img|iframe|source)\b[^>]*>", page, re.I)
    assert not [t for t in tags if re.search(r"\b(?:src|href)\s*=", t, re.I)], "every script, style, image inline"
    markup = re.sub(r"(<script\b[^>]*>).*?(</script>)", r"\1\2", page, flags=re.S | re.I)
    assert not re.search(r"https?:|//[a-z]", markup, re.I), "no URL outside the (offline) scripts"
    data = page_data(page)
    assert data["image"]["src"].startswith("data:image/png;base64,") and data["branches"] == ["cond", "uncond"]
    assert data["layers"] == [0, 1, 2, 3] and data["steps"] == [0, 1, 2] and data["layer_kind"] is None
    df = res.to_dataframe()  # quadrant map: attention == 'attn', mean over heads and over the branch's rows
    for branch in ("cond", "uncond"):
        for quad in mp.QUADRANTS:
            q, k = quad.split("->")
            sub = df[(df.attention == "attn") & (df.branch == branch) & (df["query"] == q) & (df["key"] == k)]
            cell = sub.groupby(["layer", "step"])["mass"].mean().unstack("step").to_numpy()
            np.testing.assert_allclose(data["quadrant_map"][branch][quad], cell, atol=1e-5)
            heads = sub.groupby(["layer", "step", "head"])["mass"].mean().to_numpy()
            np.testing.assert_allclose(np.ravel(data["head_mass"][branch][quad]), heads, atol=1e-5)
    assert data["groups"]["groups"] == list(mp.TEXT_GROUPS)  # image queries, head mean, [group][layer][step]
    gm = res.stat("group_mass").sel(query="image", attention="attn", batch=1, key_group="t5_real").mean("head")
    np.testing.assert_allclose(data["groups"]["values"]["cond"][3], gm.values.numpy().T, atol=1e-5)
    wm = data["word_maps"]  # every word, layer (+ mean) and step (+ mean), 8-bit with a scale per map
    assert wm["words"] == list(res.words) and wm["layers"] == [0, 1, 2, 3] and wm["steps"] == [0, 1, 2]
    for word in ("red", "square"):
        for layer_opt, layer in ((0, None), (3, 2)):
            for step_opt, step in ((1, 1), (3, None)):
                close(decode(wm, "cond", word, layer_opt, step_opt), res.word_map(word, step=step, layer=layer, batch=1))
    res, img = flux  # Flux: block kinds on the layer axis, the token groups it has
    data = explore(res, image=img).data
    assert data["layer_kind"] == ["joint", "joint", "single", "single"] and data["branches"] == ["cond"]
    assert data["groups"]["groups"] == ["t5_real", "t5_special", "t5_padding"]  # Flux has no CLIP tokens
    close(decode(data["word_maps"], "cond", "blue", 4, 2), res.word_map("blue", step=2, layer=3, batch=0))


def test_selection_narrows_the_page(sd3):
    res, img = sd3
    full = explore(res, image=img)
    small = explore(res, words=["Red", "circle"], layers=[], steps=[0], branch="cond")
    wm = small.data["word_maps"]
    assert (wm["words"], wm["layers"], wm["steps"], list(wm["maps"])) == (["red", "circle"], [], [0], ["cond"])
    assert small.data["branches"] == ["cond"] and small.sizes()["data"] < full.sizes()["data"] / 5
    assert explore(res, words=[]).data["word_maps"] is None
    for kwargs, match in (({"words": ["triangle"]}, "recorded words: a, red"), ({"layers": [7]}, r"layer \[7\] not"),
                          ({"heads": [0]}, "word_heads='all'"), ({"branch": "negative"}, "branch")):
        with pytest.raises(ValueError, match=match):
            explore(res, **kwargs)
    res, _ = record(mp.tiny_sd3_pipeline(), word_heads="all")  # single heads, when recorded per head
    wm = explore(res, heads=[1, 3], words=["blue"]).data["word_maps"]
    assert wm["heads"] == [1, 3] and wm["per_head_recorded"] and explore(res).data["word_maps"]["heads"] == []
    close(decode(wm, "cond", "blue", 2, 0, 2), res.word_map("blue", step=0, layer=1, head=3, batch=1))
    close(decode(wm, "cond", "blue", 0, 3, 0), res.word_map("blue", head="mean", batch=1))
    assert explore(res, heads="all", words=["blue"]).data["word_maps"]["heads"] == [0, 1, 2, 3]


def test_budget_refusal_names_how_to_narrow(sd3):
    res, _ = sd3
    full = explore(res)
    budget = full.nbytes - 15_000  # the word maps of the full page no longer fit
    with pytest.raises(ExploreBudgetError) as err:
        explore(res, max_bytes=budget)
    assert all(h in str(err.value) for h in ("words=", "steps=", "layers=[]", "--layers mean", "--branch cond", "max_bytes"))
    assert re.search(r"For example (.*?) \(", str(err.value)).group(1) == "layers=[]"
    assert explore(res, layers=[], max_bytes=budget).nbytes <= budget  # the suggested narrowing fits
    with pytest.raises(ExploreBudgetError, match="raise the budget"):
        explore(res, max_bytes=1_000_000)  # plotly.js alone is larger
    assert explore(res, max_bytes=None).nbytes == full.nbytes < DEFAULT_MAX_BYTES


def test_notebook_display_and_file(sd3, tmp_path, capsys):
    res, img = sd3
    page = mp.explore(res, image=img)
    assert isinstance(page, Explorer) and page.path is None
    srcdoc = re.match(r'<iframe srcdoc="(.*?)" style', page._repr_html_(), re.S).group(1)
    assert html_lib.unescape(srcdoc) == page.html
    saved = mp.explore(res, path=tmp_path / "run.html", image=img)
    assert (tmp_path / "run.html").read_text(encoding="utf-8") == saved.html and saved.path == tmp_path / "run.html"
    assert re.search(r"wrote .*run\.html: \d+\.\d MB \(plotly\.js \d+\.\d MB, data \d+ kB", capsys.readouterr().out)


def test_sweep_page_data(sweep_csv):
    df = pd.read_csv(sweep_csv)
    data = explore(sweep_csv).data
    assert data["kind"] == "sweep" and data["x"] == "layer" and data["hue"] is None
    series = data["final"]["image_mse"]["series"][0]
    final = df[(df.metric == "image_mse") & df.step.isna()].groupby("spec_index")["value"]
    np.testing.assert_allclose(series["mean"], final.mean(), rtol=1e-4)
    np.testing.assert_allclose(series["hi"], series["mean"] + final.std(), rtol=1e-4)
    assert len(series["points"]["y"]) == 8 and series["x"] == ["0", "1", "2", "3"]
    assert {s["spec"] for s in data["per_step"]["velocity_mse"]["series"]} == set(df.spec)
    ko = explore(knock_out_table()).data
    assert ko["hue"] == "quadrant" and [s["name"] for s in ko["final"]["image_mse"]["series"]] == list(mp.QUADRANTS)
    with pytest.raises(ValueError, match="sweep page takes none"):
        explore(knock_out_table(), words=["red"])


def test_cli(sd3, sweep_csv, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(SUBCOMMANDS, "explore", explore_cli.COMMANDS["explore"])  # whether or not cli registers it
    res, img = sd3
    results, meta = tmp_path / "run.safetensors", {**res.meta, "run": {"prompt": PROMPT, "image": "run_image.png"}}
    mp.AttentionResult(res.stats, res.maps, res.map_meta, res.layouts, meta).save(results)
    img.save(tmp_path / "run_image.png")
    assert main(["explore", str(results), "-o", str(tmp_path / "run.html")]) == 0
    assert re.search(r"wrote .*run\.html: \d+\.\d MB \(plotly\.js", capsys.readouterr().out)
    data = page_data((tmp_path / "run.html").read_text(encoding="utf-8"))
    assert data["image"]["width"] == 40 and data["info"]["prompt"] == PROMPT  # the recorded image, found
    assert main(["explore", str(results), "-o", str(tmp_path / "small.html"), "--words", "red", "--layers", "mean",
                 "--steps", "0,2", "--branch", "cond"]) == 0
    wm = page_data((tmp_path / "small.html").read_text(encoding="utf-8"))["word_maps"]
    assert (wm["words"], wm["layers"], wm["steps"], list(wm["maps"])) == (["red"], [], [0, 2], ["cond"])
    assert main(["explore", str(results), "--max-mb", str(((tmp_path / "run.html").stat().st_size - 15e3) / 1e6)]) == 2
    err = capsys.readouterr().err
    assert "over the budget" in err and "--layers mean" in err and "Traceback" not in err
    assert main(["explore", str(sweep_csv)]) == 0 and sweep_csv.with_suffix(".html").is_file()
    assert main(["explore", str(sweep_csv), "--words", "red"]) == 2
    assert main(["explore", str(tmp_path / "missing.safetensors")]) == 2


@pytest.fixture(scope="module")
def chromium(tmp_path_factory):
    """A headless Chromium context with the network off (skips, saying why, where none can be run)."""
    exe = os.environ.get("CHROMIUM") or next(filter(None, map(shutil.which, ("chromium", "chromium-browser"))), None)
    if exe is None:
        pytest.skip("no Chromium found (apt-get install chromium, or set CHROMIUM=/path/to/chrome): browser tests skipped")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    with sync_api.sync_playwright() as p:  # Playwright passes --headless and --user-data-dir itself
        try:
            ctx = p.chromium.launch_persistent_context(
                str(tmp_path_factory.mktemp("chromium-profile")), executable_path=exe, headless=True, offline=True,
                args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                      "--disable-sync", "--no-first-run"], viewport={"width": 1400, "height": 1600})
        except Exception as err:  # noqa: BLE001 - whatever stops it starting: no usable browser here
            pytest.skip(f"Chromium at {exe} did not start ({str(err).splitlines()[0]}): browser tests skipped")
        yield ctx
        ctx.close()


@contextmanager
def opened(ctx, path):
    """The page at ``path`` once drawn; on leaving, no console errors, page errors or network requests."""
    page, problems = ctx.new_page(), []
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("request", lambda r: None if r.url.startswith(("file:", "data:", "blob:", "about:"))
            else problems.append(f"request: {r.url}"))
    page.goto(path.resolve().as_uri())
    page.wait_for_selector("body[data-ready='1']", timeout=60_000)
    yield page
    page.close()
    assert not problems, problems


def click_at(page, div: str, n: int, x: float, y: float | None = None) -> None:
    """A real mouse click on plot ``div``, subplot ``n``, at data coordinates (``y`` None: half the first bar)."""
    page.mouse.click(*page.evaluate("""([id, n, x, y]) => {
        const gd = document.getElementById(id), a = n > 1 ? String(n) : "", fl = gd._fullLayout, r = gd.getBoundingClientRect();
        const xa = fl["xaxis" + a], ya = fl["yaxis" + a], yy = y === null ? gd.data[0].y[x] / 2 : y;
        return [r.left + xa._offset + xa.l2p(x), r.top + ya._offset + ya.l2p(yy)]; }""", [div, n, x, y]))


def el(page, id_: str, expr: str):  # document.getElementById(id_)<expr>, evaluated in the page
    return page.evaluate(f"document.getElementById('{id_}'){expr}")


def test_result_page_in_chromium(chromium, sd3, tmp_path):
    res, img = sd3
    explore(res, path=tmp_path / "run.html", image=img, quiet=True)

    def shows(word: str, batch: int = 1, **where) -> None:  # the heatmap drawn over the image is that word map
        z = el(page, "mp-wordmap", ".data.find(t => t.type === 'heatmap').z")
        close(np.array(z, dtype=float), res.word_map(word, batch=batch, **where))

    with opened(chromium, tmp_path / "run.html") as page:
        assert el(page, "mp-quadrants", ".data.length") == 4
        assert el(page, "mp-wordmap", ".dataset.word") == "red"  # the first word that is not a stop word
        shows("red", step=0)  # mean over layers, step 0
        before = page.screenshot(full_page=True)
        page.select_option("#mp-word", "square")
        assert el(page, "mp-wordmap", ".dataset.word") == "square"
        shows("square", step=0)
        assert page.screenshot(full_page=True) != before
        page.evaluate("(s => { s.value = '2'; s.dispatchEvent(new Event('input')); })(document.getElementById('mp-word-step'))")
        shows("square", step=2)
        page.check("#mp-word-step-mean")
        shows("square")
        click_at(page, "mp-quadrants", 2, 1, 2)  # a real click on image->text at layer 2, step 1
        page.wait_for_function("document.getElementById('mp-status').dataset.layer === '2'")
        assert el(page, "mp-status", ".dataset") == {"layer": "2", "step": "1", "quadrant": "image->text", "branch": "cond"}
        assert page.input_value("#mp-head-step") == "1" and page.input_value("#mp-word-layer") == "3"
        assert el(page, "mp-wordmap", ".dataset.layer") == "layer 2"
        shows("square", step=1, layer=2)
        heads = np.asarray(page_data((tmp_path / "run.html").read_text())["head_mass"]["cond"]["image->text"])[:, 1]
        np.testing.assert_allclose(el(page, "mp-heads", ".data[0].z"), heads)
        page.select_option("#mp-branch", "uncond")
        assert el(page, "mp-status", ".dataset.branch") == "uncond"
        shows("square", batch=0, step=1, layer=2)  # the empty negative prompt has no "square": all missing


def test_flux_page_in_chromium(chromium, flux, tmp_path):
    res, img = flux
    explore(res, path=tmp_path / "flux.html", image=img, quiet=True)
    with opened(chromium, tmp_path / "flux.html") as page:
        ticks = page.evaluate("Array.from(document.querySelectorAll('#mp-quadrants .ytick text'), t => t.textContent)")
        assert "0 joint" in ticks and "3 single" in ticks  # block kind on the layer axis
        legend = page.evaluate("Array.from(document.querySelectorAll('#mp-groups .legendtext'), t => t.textContent)")
        assert sorted(legend) == ["T5 padding", "T5 prompt tokens", "T5 special (EOS)"]


def test_sweep_page_in_chromium(chromium, sweep_csv, tmp_path):
    explore(sweep_csv, path=tmp_path / "sweep.html", quiet=True)
    with opened(chromium, tmp_path / "sweep.html") as page:
        y = el(page, "mp-effect", ".data[0].y")
        assert len(y) == 4 and el(page, "mp-effect", ".dataset.metric") == "image_mse"
        page.select_option("#mp-metric", "image_psnr")
        assert el(page, "mp-effect", ".data[0].y") != y
        page.select_option("#mp-metric", "image_mse")
        click_at(page, "mp-effect", 1, 2)  # the bar of layer 2
        page.wait_for_function("document.getElementById('mp-step-effect').dataset.picked === '2'")
        assert el(page, "mp-step-effect", ".data.map(t => t.opacity)") == [0.15, 0.15, 1, 0.15]
