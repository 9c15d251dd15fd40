"""Step-count study: sigmas from the scheduler, masses from the recorder, interpolation, figure."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from mmdit_probe.models import tiny_sd3_pipeline
from mmdit_probe.steps import (
    image_convergence,
    interpolate_at_sigmas,
    layer_groups,
    plot_mass_vs_sigma,
    schedule,
    step_count_study,
)

PROMPT = "a red circle left of a blue square"
COUNTS = (2, 4, 8)
CALL = dict(height=32, width=32, max_sequence_length=16, guidance_scale=5.0)


@pytest.fixture(scope="module")
def pipe():
    return tiny_sd3_pipeline("sd35")


@pytest.fixture(scope="module")
def study(pipe):
    return step_count_study(pipe, PROMPT, COUNTS, seed=0, return_runs=True, **CALL)


def test_schedule_is_the_pipelines_and_leaves_it_alone(pipe):
    before = pipe.scheduler.timesteps.clone()
    sched = schedule(pipe, 5)
    assert torch.equal(pipe.scheduler.timesteps, before)
    fresh = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    fresh.set_timesteps(5)
    assert sched.timesteps == pytest.approx(fresh.timesteps.tolist())
    assert sched.sigmas == pytest.approx(fresh.sigmas.tolist())


def test_layer_groups_cover_layers_in_order():
    for n in (1, 2, 4, 24):
        g = layer_groups(n)
        assert sorted(g) == list(range(n))
        order = [g[i] for i in range(n)]
        assert order == sorted(order, key=["early", "middle", "late"].index)  # contiguous, early first
        sizes = [order.count(x) for x in dict.fromkeys(order)]
        assert max(sizes) - min(sizes) <= 1


def test_study_sigmas_and_masses(pipe, study):
    df = study.table
    T = pipe.scheduler.config.num_train_timesteps
    for n in COUNTS:
        d = df[df["steps"] == n]
        assert d["step"].nunique() == n
        # flow matching: sigma = timestep / num_train_timesteps (independent of the schedule lookup)
        assert np.allclose(d["sigma"], d["timestep"] / T, atol=1e-5)
        fresh = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
        fresh.set_timesteps(n)
        assert sorted(d["sigma"].unique(), reverse=True) == pytest.approx(fresh.sigmas[:-1].tolist(), abs=1e-6)
    # masses: the table is the head mean of the recorded tensor (recomputed from the result's tensor)
    res = study.results[4]
    m = res.mass.sel(attention="attn")  # step, layer, batch, head, query, key
    row = res.branches.index("cond")
    expected = m.values[:, :, row].mean(dim=2)  # step, layer, query, key
    d = df[(df["steps"] == 4) & (df["attention"] == "attn") & (df["branch"] == "cond")]
    got = torch.full_like(expected, float("nan"))
    qi = {"image": 0, "text": 1}
    for r in d.itertuples():
        got[r.step, r.layer, qi[r.query], qi[r.key]] = r.mass
    assert torch.allclose(got, expected, atol=1e-6)
    assert torch.allclose(expected.sum(-1), torch.ones(()), atol=1e-5)


def test_interpolation_at_common_sigmas(study):
    df = study.table
    by = ("attention", "branch", "layer_group", "quadrant")
    sel = (df["attention"] == "attn") & (df["branch"] == "cond") & (df["layer_group"] == "early") & (df["quadrant"] == "image->text")
    curve = df[sel & (df["steps"] == 8)].groupby("sigma")["mass"].mean().sort_index()
    xs, ys = curve.index.to_numpy(), curve.to_numpy()
    mid = float((xs[2] + xs[3]) / 2)
    out = interpolate_at_sigmas(df, sigmas=[xs[2], mid, 1.5], by=by)
    o = out[(out["attention"] == "attn") & (out["branch"] == "cond") & (out["layer_group"] == "early")
            & (out["quadrant"] == "image->text") & (out["steps"] == 8)].set_index("sigma")["mass"]
    assert o[xs[2]] == pytest.approx(ys[2])
    assert o[mid] == pytest.approx((ys[2] + ys[3]) / 2)  # linear in sigma, by hand
    assert np.isnan(o[1.5])  # outside the recorded range: no extrapolation
    default = interpolate_at_sigmas(df, by=by)
    grid = sorted(default["sigma"].unique())
    assert grid == pytest.approx(sorted(df[df["steps"] == 2]["sigma"].unique()))
    assert set(default["steps"]) == set(COUNTS) and default["mass"].notna().all()


def test_image_convergence(study):
    conv = image_convergence(study.images)
    ref = study.images[max(COUNTS)].double()
    for r in conv.itertuples():
        assert r.mse == pytest.approx(float(((study.images[r.steps].double() - ref) ** 2).mean()))
    assert conv.set_index("steps").loc[max(COUNTS), "mse"] == 0


def test_plot_mass_vs_sigma(study):
    import matplotlib.pyplot as plt

    fig = plot_mass_vs_sigma(study.table)
    try:
        n_groups = study.table["layer_group"].nunique()
        axes = fig.get_axes()
        assert len(axes) == 4 * n_groups
        for ax in axes:
            assert len(ax.get_lines()) == len(COUNTS)
            assert ax.get_xlim()[0] > ax.get_xlim()[1]  # noise on the left
        labels = [t.get_text() for t in axes[n_groups - 1].get_legend().get_texts()]
        assert labels == [f"{n} steps" for n in COUNTS]
        assert axes[-1].get_xlabel().startswith("sigma")
        with pytest.raises(KeyError, match="branch"):
            plot_mass_vs_sigma(study.table, branch="nope")
    finally:
        plt.close("all")
