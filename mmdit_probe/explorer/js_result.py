"""The script of a result page (quadrant map, word maps, head grid, text groups), kept as a string so the
page needs no file beside the package's Python modules. Runs after ``COMMON_JS`` (``MP`` helpers)."""

RESULT_JS = r"""
(function () {
  const D = MP.data, $ = (id) => document.getElementById(id), L = D.layers, T = D.steps, W = D.word_maps;
  const S = {branch: D.branches[0], layer: null, step: null,
             quadrant: D.quadrants.includes("image->text") ? "image->text" : D.quadrants[0]};
  const WS = {word: null, layer: 0, step: 0, stepMean: false, head: 0, perWord: true};
  const STOP = ["a", "an", "the", "of", "and", "in", "on", "at", "to", "with", "by", "for", "is"];
  const qlabel = (q) => q.replace("->", " → ");
  const layerName = (i) => D.layer_kind ? `${L[i]} ${D.layer_kind[i]}` : String(L[i]);
  const stepName = (j) => `step ${T[j]}` + (D.timesteps[j] !== undefined ? ` (t=${Math.round(D.timesteps[j])})` : "");
  const idx = (n) => Array.from({length: n}, (_, i) => i);
  const gap = (n) => (n <= 30 ? 1 : 0);  // white lines between cells, while cells are large
  const MAGMA = [[0, "#000004"], [0.25, "#51127c"], [0.5, "#b73779"], [0.75, "#fc8961"], [1, "#fcfdbf"]];
  const GROUP_COLORS = {clip_real: "#08519c", clip_special: "#4292c6", clip_padding: "#9ecae1",
                        t5_real: "#a63603", t5_special: "#f16913", t5_padding: "#fdae6b"};

  function layerAxis(extra, most) {
    const k = MP.thin(L.length, most || 24), vals = idx(L.length).filter((i) => i % k === 0);
    return Object.assign({title: {text: D.layer_kind ? "layer (block kind)" : "layer"}, tickvals: vals,
                          ticktext: vals.map(layerName), range: [-0.5, L.length - 0.5], zeroline: false}, extra || {});
  }
  function stepAxis(extra) {
    const k = MP.thin(T.length, 12), vals = idx(T.length).filter((j) => j % k === 0);
    return Object.assign({title: {text: "denoising step"}, tickvals: vals, ticktext: vals.map((j) => String(T[j])),
                          range: [-0.5, T.length - 0.5], zeroline: false}, extra || {});
  }
  function kindShapes(xref, yref, vertical) {  // a dotted line where the block kind changes (Flux: joint | single)
    const out = [];
    if (!D.layer_kind) return out;
    for (let i = 1; i < L.length; i++) {
      if (D.layer_kind[i] === D.layer_kind[i - 1]) continue;
      const line = {color: vertical ? "#555" : "#fff", width: 2, dash: "dot"};
      out.push(vertical ? {type: "line", xref, yref: yref + " domain", x0: i - 0.5, x1: i - 0.5, y0: 0, y1: 1, line}
                        : {type: "line", xref: xref + " domain", yref, x0: 0, x1: 1, y0: i - 0.5, y1: i - 0.5, line});
    }
    return out;
  }

  // ---- quadrant map ------------------------------------------------------------------------------
  function drawQuadrants() {
    const qm = D.quadrant_map[S.branch];
    let lo = Infinity, hi = -Infinity;
    D.quadrants.forEach((q) => qm[q].forEach((r) => r.forEach((v) => {
      if (MP.finite(v)) { lo = Math.min(lo, v); hi = Math.max(hi, v); } })));
    const pos = [[0, 0.44, 0.58, 1], [0.54, 0.98, 0.58, 1], [0, 0.44, 0, 0.42], [0.54, 0.98, 0, 0.42]];
    const custom = L.map((_, i) => T.map((_, j) => `layer ${layerName(i)}, ${stepName(j)}`));
    const traces = [], layout = {annotations: [], shapes: [], margin: {l: 90, r: 10, t: 30, b: 50},
      coloraxis: {colorscale: "Viridis", cmin: lo, cmax: hi, colorbar: {title: {text: "mass"}, thickness: 12}}};
    D.quadrants.forEach((q, n) => {
      const a = n ? String(n + 1) : "", p = pos[n];
      traces.push({type: "heatmap", name: q, z: qm[q], x: idx(T.length), y: idx(L.length), coloraxis: "coloraxis",
                   xaxis: "x" + a, yaxis: "y" + a, customdata: custom, xgap: gap(T.length), ygap: gap(L.length),
                   hovertemplate: `${qlabel(q)}<br>%{customdata}<br>mass %{z:.3f}<extra></extra>`});
      layout["xaxis" + a] = stepAxis({domain: [p[0], p[1]], anchor: "y" + a, title: {text: n >= 2 ? "denoising step" : ""}});
      layout["yaxis" + a] = layerAxis({domain: [p[2], p[3]], anchor: "x" + a}, 12);
      if (n % 2) Object.assign(layout["yaxis" + a], {title: {text: ""}, showticklabels: false});
      layout.annotations.push({text: `<b>${qlabel(q)}</b>`, xref: `x${a} domain`, yref: `y${a} domain`, x: 0.5, y: 1,
                               yanchor: "bottom", showarrow: false});
      layout.shapes.push(...kindShapes("x" + a, "y" + a, false));
      if (S.layer !== null) {
        const on = q === S.quadrant;
        layout.shapes.push({type: "rect", xref: "x" + a, yref: "y" + a, x0: S.step - 0.5, x1: S.step + 0.5,
                            y0: S.layer - 0.5, y1: S.layer + 0.5,
                            line: {color: on ? "#e4002b" : "#ff9aa8", width: on ? 3 : 1.5}});
      }
    });
    return MP.draw("mp-quadrants", traces, layout);
  }

  // ---- word maps ---------------------------------------------------------------------------------
  const cache = {};
  function bytesOf(b, w) {
    const k = b + "\u0000" + w;
    if (!cache[k]) {
      const s = atob(W.maps[b][w].b64), u = new Uint8Array(s.length);
      for (let i = 0; i < s.length; i++) u[i] = s.charCodeAt(i);
      cache[k] = u;
    }
    return cache[k];
  }
  function mapIndex(li, si, hi) { return (li * (W.steps.length + 1) + si) * (W.heads.length + 1) + hi; }
  function wordGrid(b, w, k) {  // k: map index; value = byte / 254 * scale, 255 = missing
    const [h, wd] = W.grid, n = h * wd, sc = W.maps[b][w].scale[k], u = bytesOf(b, w), z = [];
    for (let r = 0; r < h; r++) {
      const row = [];
      for (let c = 0; c < wd; c++) { const v = u[k * n + r * wd + c]; row.push(v === 255 ? null : v / 254 * sc); }
      z.push(row);
    }
    return z;
  }
  function buildWordControls() {
    if (!W) {
      $("mp-wordmap").style.display = "none";
      $("mp-word-caption").textContent = "No word maps in this result: record with AttentionRecorder(pipe, words=True).";
      return;
    }
    $("mp-word-controls").innerHTML = `<label>word <select id="mp-word"></select></label>
      <label>layer <select id="mp-word-layer"></select></label>
      <label>step <input type="range" id="mp-word-step" min="0" max="${Math.max(0, W.steps.length - 1)}" value="0">
      <span id="mp-word-step-label"></span></label>
      <label><input type="checkbox" id="mp-word-step-mean"> mean over steps</label>
      <label>head <select id="mp-word-head"></select></label>
      <label><input type="checkbox" id="mp-word-scale"> one colour scale for all words</label>`;
    MP.options($("mp-word"), W.words, W.words.map((w) => `“${w}”`), W.words.find((w) => !STOP.includes(w)) || W.words[0]);
    MP.options($("mp-word-layer"), idx(W.layers.length + 1),
               ["mean over layers"].concat(W.layers.map((l) => "layer " + layerName(L.indexOf(l)))));
    MP.options($("mp-word-head"), idx(W.heads.length + 1), ["mean over heads"].concat(W.heads.map((h) => "head " + h)));
    $("mp-word-head").disabled = !W.heads.length;
    $("mp-word-head").title = W.per_head_recorded ? "pass heads=[...] / --heads to carry single heads"
                                                  : "recorded as head means (word_heads='all' records each head)";
    if (!W.steps.length) {  // steps=[]: only the mean over steps was carried
      $("mp-word-step").disabled = true;
      Object.assign($("mp-word-step-mean"), {checked: true, disabled: true});
    }
    ["mp-word", "mp-word-layer", "mp-word-step", "mp-word-step-mean", "mp-word-head", "mp-word-scale"].forEach((id) =>
      $(id).addEventListener("input", () => { readWordControls(); drawWords(); }));
    readWordControls();
  }
  function readWordControls() {
    WS.word = $("mp-word").value; WS.layer = +$("mp-word-layer").value; WS.step = +$("mp-word-step").value;
    WS.stepMean = $("mp-word-step-mean").checked || !W.steps.length; WS.head = +$("mp-word-head").value;
    WS.perWord = !$("mp-word-scale").checked;
  }
  function drawWords() {
    if (!W) return null;
    const si = WS.stepMean ? W.steps.length : WS.step, k = mapIndex(WS.layer, si, WS.head), [h, wd] = W.grid;
    const scales = W.words.map((w) => W.maps[S.branch][w].scale[k]);
    const zmax = WS.perWord ? W.maps[S.branch][WS.word].scale[k] : Math.max(...scales);
    const stepText = WS.stepMean ? "mean over steps" : stepName(T.indexOf(W.steps[WS.step]));
    $("mp-word-step-label").textContent = W.steps.length ? stepText : "";
    const layerText = WS.layer ? "layer " + layerName(L.indexOf(W.layers[WS.layer - 1])) : "mean over layers";
    const headText = WS.head ? "head " + W.heads[WS.head - 1] : "mean over heads";
    const traces = [];
    if (D.image) traces.push({type: "image", source: D.image.src, dx: wd / D.image.width, dy: h / D.image.height,
                              x0: -0.5 + wd / D.image.width / 2, y0: -0.5 + h / D.image.height / 2, hoverinfo: "skip"});
    traces.push({type: "heatmap", name: WS.word, z: wordGrid(S.branch, WS.word, k), zmin: 0, zmax: zmax > 0 ? zmax : 1,
                 colorscale: MAGMA, opacity: D.image ? 0.6 : 1, zsmooth: "best",
                 colorbar: {title: {text: "mass"}, thickness: 12},
                 hovertemplate: "row %{y}, column %{x}<br>mass %{z:.4f}<extra></extra>"});
    const axis = {showgrid: false, zeroline: false, showticklabels: false, ticks: "", constrain: "domain"};
    const div = $("mp-wordmap");
    Object.assign(div.dataset, {word: WS.word, layer: layerText, step: stepText, head: headText});
    $("mp-word-caption").textContent = `Image queries' attention to “${WS.word}” over the ${h}×${wd} image grid: ` +
      `${layerText}, ${stepText}, ${headText}, ${S.branch} branch` + (D.image ? "; drawn over the generated image." : ".");
    return MP.draw(div, traces, {margin: {l: 10, r: 10, t: 36, b: 10},
      title: {text: `“${WS.word}” · ${layerText} · ${stepText} · ${headText}`, font: {size: 13}},
      xaxis: Object.assign({range: [-0.5, wd - 0.5]}, axis),
      yaxis: Object.assign({range: [h - 0.5, -0.5], scaleanchor: "x"}, axis)});
  }

  // ---- head grid and text groups -----------------------------------------------------------------
  function stepValue(row, sel) { return sel === "mean" ? MP.nanmean(row) : row[+sel]; }
  function drawHeads() {
    const q = $("mp-head-quadrant").value, sel = $("mp-head-step").value, hm = D.head_mass[S.branch][q];
    const z = hm.map((row) => D.heads.map((_, h) => stepValue(row.map((s) => s[h]), sel)));
    const shapes = kindShapes("x", "y", false);
    if (S.layer !== null) shapes.push({type: "rect", xref: "x domain", yref: "y", x0: 0, x1: 1, y0: S.layer - 0.5,
                                       y1: S.layer + 0.5, line: {color: "#e4002b", width: 2}});
    return MP.draw("mp-heads", [{type: "heatmap", z, x: idx(D.heads.length), y: idx(L.length), colorscale: "Viridis",
      xgap: gap(D.heads.length), ygap: gap(L.length), colorbar: {title: {text: "mass"}, thickness: 12},
      customdata: L.map((_, i) => D.heads.map((hd) => `layer ${layerName(i)}, head ${hd}`)),
      hovertemplate: "%{customdata}<br>mass %{z:.3f}<extra></extra>"}],
      {margin: {l: 90, r: 10, t: 36, b: 50}, shapes,
       title: {text: `${qlabel(q)} · ${sel === "mean" ? "mean over steps" : stepName(+sel)} · ${S.branch}`, font: {size: 13}},
       xaxis: {title: {text: "head"}, tickvals: idx(D.heads.length), ticktext: D.heads.map(String), zeroline: false},
       yaxis: layerAxis({}, 20)});
  }
  function drawGroups() {
    const G = D.groups;
    if (!G) {
      $("mp-groups").innerHTML =
        "<p class='caption'>No text-group masses: record with AttentionRecorder(pipe, groups=True).</p>";
      return null;
    }
    const sel = $("mp-group-step").value, norm = $("mp-group-norm").checked, vals = G.values[S.branch];
    let per = vals.map((g) => g.map((row) => stepValue(row, sel)));  // [group][layer]
    if (norm) {
      const tot = L.map((_, i) => per.reduce((s, g) => s + (MP.finite(g[i]) ? g[i] : 0), 0));
      per = per.map((g) => g.map((v, i) => (MP.finite(v) && tot[i] > 0 ? v / tot[i] : null)));
    }
    const shapes = kindShapes("x", "y", true);
    if (S.layer !== null) shapes.push({type: "rect", xref: "x", yref: "y domain", x0: S.layer - 0.5, x1: S.layer + 0.5,
                                       y0: 0, y1: 1, line: {color: "#e4002b", width: 2}});
    const traces = G.groups.map((g, k) => ({type: "bar", name: G.labels[k], x: idx(L.length), y: per[k],
      marker: {color: GROUP_COLORS[g] || "#888"}, customdata: L.map((_, i) => layerName(i)),
      hovertemplate: `${G.labels[k]}<br>layer %{customdata}: %{y:.3f}<extra></extra>`}));
    return MP.draw("mp-groups", traces, {barmode: "stack", shapes, margin: {l: 60, r: 10, t: 36, b: 50},
      title: {text: `${sel === "mean" ? "mean over steps" : stepName(+sel)} · ${S.branch}`, font: {size: 13}},
      legend: {orientation: "h", y: -0.25}, xaxis: layerAxis({title: {text: "layer"}}),
      yaxis: {title: {text: norm ? "fraction of image → text attention" : "attention mass"}}});
  }

  // ---- selection ---------------------------------------------------------------------------------
  function status() {
    const s = $("mp-status");
    s.textContent = S.layer === null ? "Click a cell of the quadrant map to open that layer and step below." :
      `Selected: layer ${layerName(S.layer)}, ${stepName(S.step)}, ${qlabel(S.quadrant)} (${S.branch} branch)`;
    Object.assign(s.dataset, {layer: S.layer === null ? "" : L[S.layer], step: S.step === null ? "" : T[S.step],
                              quadrant: S.quadrant, branch: S.branch});
  }
  function drawAll() {
    status();
    return Promise.all([drawQuadrants(), drawWords(), drawHeads(), drawGroups()]);
  }
  function select(layer, step, quadrant) {  // layer, step: indices into D.layers / D.steps
    S.layer = layer; S.step = step; if (quadrant) S.quadrant = quadrant;
    $("mp-head-quadrant").value = S.quadrant; $("mp-head-step").value = String(step); $("mp-group-step").value = String(step);
    if (W) {
      const li = W.layers.indexOf(L[layer]), si = W.steps.indexOf(T[step]);
      if (li >= 0) $("mp-word-layer").value = String(li + 1);
      if (si >= 0) { $("mp-word-step").value = String(si); $("mp-word-step-mean").checked = false; }
      readWordControls();
    }
    return drawAll();
  }

  MP.options($("mp-branch"), D.branches, null, S.branch);
  MP.options($("mp-head-quadrant"), D.quadrants, D.quadrants.map(qlabel), S.quadrant);
  ["mp-head-step", "mp-group-step"].forEach((id) => MP.options($(id), ["mean"].concat(idx(T.length)),
    ["mean over steps"].concat(idx(T.length).map(stepName)), "mean"));
  buildWordControls();
  $("mp-branch").addEventListener("input", () => { S.branch = $("mp-branch").value; drawAll(); });
  $("mp-head-quadrant").addEventListener("input", drawHeads);
  $("mp-head-step").addEventListener("input", drawHeads);
  $("mp-group-step").addEventListener("input", drawGroups);
  $("mp-group-norm").addEventListener("input", drawGroups);
  window.mpExplorer = {state: S, words: WS, select, drawAll,
                       ready: drawAll().then(() => {
                         $("mp-quadrants").on("plotly_click", (ev) => {
                           const p = ev.points[0];
                           select(p.y, p.x, p.data.name);
                         });
                         document.body.dataset.ready = "1";
                       })};
})();
"""
