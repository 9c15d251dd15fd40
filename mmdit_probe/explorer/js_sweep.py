"""Scripts of the pages, as strings: ``COMMON_JS`` (the ``MP`` helpers every page uses) and ``SWEEP_JS``
(effect by layer with spread over seeds, per-step effect curves)."""

COMMON_JS = r"""
"use strict";
const MP = {
  data: JSON.parse(document.getElementById("mp-data").textContent),
  config: {displaylogo: false, responsive: true, modeBarButtonsToRemove: ["select2d", "lasso2d"]},
  finite: (v) => typeof v === "number" && Number.isFinite(v),
  thin: (n, most) => Math.max(1, Math.ceil(n / most)),
  nanmean(a) {
    let s = 0, n = 0;
    for (const v of a) if (MP.finite(v)) { s += v; n += 1; }
    return n ? s / n : null;
  },
  options(sel, values, labels, value) {  // fill a <select>
    sel.innerHTML = "";
    values.forEach((v, i) => {
      const o = document.createElement("option");
      o.value = String(v); o.textContent = labels ? labels[i] : String(v);
      sel.appendChild(o);
    });
    if (value !== undefined && value !== null) sel.value = String(value);
  },
  draw(div, traces, layout) {
    return Plotly.react(div, traces, Object.assign({font: {size: 12}, paper_bgcolor: "#fff", plot_bgcolor: "#fff"}, layout),
                        MP.config);
  },
};
"""

SWEEP_JS = r"""
(function () {
  const D = MP.data, $ = (id) => document.getElementById(id);
  const finals = Object.keys(D.final), stepMetrics = Object.keys(D.per_step);
  let picked = null;  // {x, hue} of the clicked bar
  const COLORS = ["#0173b2", "#de8f05", "#029e73", "#d55e00", "#cc78bc", "#ca9161", "#fbafe4", "#949494", "#ece133", "#56b4e9"];
  const xTitle = D.x === "spec" ? "ablation (in sweep order)" : `ablated ${D.x}`;

  function drawEffect() {
    if (!finals.length) return null;
    const m = $("mp-metric").value, F = D.final[m], hue = D.hue !== null, traces = [];
    F.series.forEach((s, k) => {
      const up = s.mean.map((v, i) => (MP.finite(v) && MP.finite(s.hi[i]) ? s.hi[i] - v : null));
      const down = s.mean.map((v, i) => (MP.finite(v) && MP.finite(s.lo[i]) ? v - s.lo[i] : null));
      traces.push({type: "bar", name: hue ? `${D.hue} ${s.name.replace("->", " → ")}` : m, x: s.x, y: s.mean,
                   customdata: s.specs,
                   marker: {color: COLORS[k % COLORS.length]}, meta: s.name,
                   error_y: {type: "data", symmetric: false, array: up, arrayminus: down, color: "#333", thickness: 1,
                             width: 2},
                   hovertemplate: "%{customdata}<br>mean %{y:.4g}<extra></extra>"});
    });
    if (!hue) {
      const p = F.series[0].points;
      traces.push({type: "scatter", mode: "markers", name: "single runs", x: p.x, y: p.y, text: p.text,
                   marker: {color: "#000", size: 5, opacity: 0.6}, hovertemplate: "%{text}<br>%{y:.4g}<extra></extra>"});
    }
    const lo = F.range[0];
    $("mp-spread").textContent = `spread over up to ${F.runs_per_x} run(s) (seeds × prompts) per bar`;
    $("mp-effect").dataset.metric = m;
    return MP.draw("mp-effect", traces, {barmode: "group", showlegend: hue, margin: {l: 70, r: 10, t: 30, b: 90},
      title: {text: `Effect of each ablation on ${m}`, font: {size: 13}},
      xaxis: {title: {text: xTitle}, type: "category"},
      yaxis: {title: {text: `${m} (effect vs. unablated run)`}, rangemode: lo === 0 ? "nonnegative" : "normal",
              exponentformat: "e"}});
  }

  function drawSteps() {
    if (!stepMetrics.length) { $("mp-steps-section").style.display = "none"; return null; }
    const m = $("mp-step-metric").value, P = D.per_step[m], bands = P.series.length <= 6;
    const last = Math.max(0, ...P.series.map((s) => s.steps[s.steps.length - 1] || 0));
    const traces = P.series.map((s, k) => {
      const on = picked === null || (s.x === picked.x && (picked.hue === null || s.hue === picked.hue));
      const t = {type: "scatter", mode: s.steps.length <= 25 ? "lines+markers" : "lines", name: s.spec, x: s.steps, y: s.mean,
                 opacity: on ? 1 : 0.15, line: {width: on && picked !== null ? 3 : 1.5, color: COLORS[k % COLORS.length]},
                 marker: {size: 4}, hovertemplate: `${s.spec}<br>step %{x}: %{y:.4g}<extra></extra>`};
      if (bands) t.error_y = {type: "data", symmetric: false, thickness: 1, width: 0,
                              array: s.mean.map((v, i) => (MP.finite(v) && MP.finite(s.hi[i]) ? s.hi[i] - v : null)),
                              arrayminus: s.mean.map((v, i) => (MP.finite(v) && MP.finite(s.lo[i]) ? v - s.lo[i] : null))};
      return t;
    });
    $("mp-step-effect").dataset.picked = picked === null ? "" : picked.x;
    return MP.draw("mp-step-effect", traces, {margin: {l: 70, r: 10, t: 30, b: 50},
      title: {text: `Effect on ${m} by denoising step` + (picked ? ` (picked: ${D.x} ${picked.x})` : ""), font: {size: 13}},
      xaxis: {title: {text: "denoising step"}, zeroline: false, dtick: last <= 30 ? 1 : undefined},
      yaxis: {title: {text: `${m} (effect vs. unablated run)`}, exponentformat: "e"}});
  }

  MP.options($("mp-metric"), finals, null, finals.includes("image_mse") ? "image_mse" : finals[0]);
  MP.options($("mp-step-metric"), stepMetrics, null, stepMetrics.includes("velocity_mse") ? "velocity_mse" : stepMetrics[0]);
  $("mp-metric").addEventListener("input", drawEffect);
  $("mp-step-metric").addEventListener("input", drawSteps);
  function pick(x, hue) {
    picked = picked && picked.x === x && picked.hue === hue ? null : {x, hue};
    return drawSteps();
  }
  window.mpExplorer = {pick, drawEffect, drawSteps,
                       ready: Promise.all([drawEffect(), drawSteps()]).then(() => {
                         if (finals.length) $("mp-effect").on("plotly_click", (ev) => {
                           const p = ev.points[0];
                           pick(String(p.x), p.data.type === "bar" && D.hue !== null ? p.data.meta : null);
                         });
                         document.body.dataset.ready = "1";
                       })};
})();
"""
