"""Tests for mmdit_probe.sweep: long-form table, one baseline per (prompt, seed), crash-safe resume."""

from __future__ import annotations

import pandas as pd
import pytest

from mmdit_probe.ablate import AblationError
from mmdit_probe.ablate import KnockOut, SkipLayers, ZeroText
from mmdit_probe.effect import mse, run_with_effects
from mmdit_probe.maps import QUADRANTS
from mmdit_probe.models import tiny_sd3_pipeline
from mmdit_probe.sweep import COLUMNS, ablate_each_head, knock_out_each_quadrant, skip_each_layer, sweep, zero_text_each_layer

PROMPTS = ["a red circle", "a blue square"]
CALL = dict(num_inference_steps=2, height=32, width=32, max_sequence_length=16, guidance_scale=5.0)
N_METRIC_ROWS = 6 + 3 * CALL["num_inference_steps"]  # latent/image x (mse, psnr, cosine) + velocity per step


@pytest.fixture(scope="module")
def pipe():
    return tiny_sd3_pipeline("sd3")


class CallCounter:
    """Counts transformer calls (each pipeline run makes num_inference_steps of them)."""

    def __init__(self, pipe):
        self.n = 0
        self.handle = pipe.transformer.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        self.n += 1

    @property
    def runs(self) -> float:
        return self.n / CALL["num_inference_steps"]

    def close(self):
        self.handle.remove()


def test_sweep_long_form_and_one_baseline_per_prompt_seed(pipe):
    specs = [SkipLayers([1]), [ZeroText(layers=[0]), KnockOut("image->text", layers=[2])]]
    counter = CallCounter(pipe)
    try:
        df = sweep(pipe, PROMPTS, specs, seeds=[0, 1], progress=False, **CALL)
    finally:
        counter.close()
    assert counter.runs == 2 * 2 * (1 + len(specs))  # one baseline per (prompt, seed)
    assert list(df.columns) == COLUMNS and len(df) == 2 * 2 * len(specs) * N_METRIC_ROWS
    assert set(df.spec) == {"skip block 1", "zero text into block 0 + knock out image->text in block 2"}
    assert df[df.metric == "image_mse"].step.isna().all()
    assert sorted(df[df.metric == "velocity_mse"].step.unique()) == [0, 1]
    one = df[(df.prompt == "a blue square") & (df.seed == 1) & (df.spec_index == 0)].set_index(["metric", "step"]).value
    eff = run_with_effects(pipe, "a blue square", SkipLayers([1]), seed=1, **CALL).table.set_index(["metric", "step"]).value
    pd.testing.assert_series_equal(one.sort_index(), eff.sort_index(), check_names=False)


def test_resume_after_crash_skips_finished_runs(pipe, tmp_path):
    path = tmp_path / "sweep.csv"
    good = [SkipLayers([0]), ZeroText(layers=[1]), KnockOut("text->image", layers=[2])]
    broken = [good[0], ZeroText(words=["zebra"]), good[2]]  # fails on its first transformer call
    counter = CallCounter(pipe)
    try:
        with pytest.raises(AblationError, match="zebra"):
            sweep(pipe, PROMPTS, broken, seeds=[0], save_to=path, progress=False, **CALL)
        saved = pd.read_csv(path)
        assert set(saved.spec_index) == {0} and set(saved.prompt) == {PROMPTS[0]} and len(saved) == N_METRIC_ROWS
        counter.n = 0
        df = sweep(pipe, PROMPTS, good, seeds=[0], save_to=path, progress=False, **CALL)
        # prompt 0: baseline + specs 1, 2 (spec 0 was saved); prompt 1: baseline + 3 specs
        assert counter.runs == (1 + 2) + (1 + 3)
        assert len(df) == 2 * 3 * N_METRIC_ROWS and not df.duplicated(["prompt", "seed", "spec_index", "metric", "step"]).any()
        first = df[(df.prompt == PROMPTS[0]) & (df.spec_index == 0)].reset_index(drop=True)
        assert first.value.tolist() == saved.value.tolist()  # the finished rows came back unchanged
        counter.n = 0
        again = sweep(pipe, PROMPTS, good, seeds=[0], save_to=path, progress=False, **CALL)
        assert counter.n == 0  # everything finished: no baseline either
        pd.testing.assert_frame_equal(again, df)
    finally:
        counter.close()
    assert list(tmp_path.iterdir()) == [path]  # no temporary files left behind


def test_rows_are_saved_after_each_spec(pipe, tmp_path):
    path = tmp_path / "s.csv"
    seen = []

    def peek(baseline, ablated):  # runs while spec i is being compared, before its rows are written
        seen.append(len(pd.read_csv(path)) if path.exists() else 0)
        return mse(baseline, ablated)

    sweep(pipe, PROMPTS[:1], skip_each_layer(pipe)[:3], metrics=[peek], save_to=path, progress=False, **CALL)
    assert seen == [0, 1, 2]
    with pytest.raises(FileExistsError, match="resume=True"):
        sweep(pipe, PROMPTS[:1], skip_each_layer(pipe)[:3], metrics=[peek], save_to=path, resume=False, **CALL)


def test_sweep_checks_everything_before_running(pipe, tmp_path):
    counter = CallCounter(pipe)
    try:
        with pytest.raises(AblationError, match="out of range"):
            sweep(pipe, PROMPTS, [SkipLayers([0]), SkipLayers([7])], progress=False, **CALL)
        with pytest.raises(AblationError, match="contradict"):
            sweep(pipe, PROMPTS, [[SkipLayers([0]), ZeroText(layers=[0])]], progress=False, **CALL)
        with pytest.raises(ValueError, match="at least one"):
            sweep(pipe, [], [SkipLayers([0])], **CALL)
        bad = tmp_path / "other.csv"
        bad.write_text("a,b\n1,2\n")
        with pytest.raises(ValueError, match="not a sweep file"):
            sweep(pipe, PROMPTS, [SkipLayers([0])], save_to=bad, progress=False, **CALL)
    finally:
        counter.close()
    assert counter.n == 0


@pytest.mark.parametrize("variant", ["sd3", "sd35"])
def test_ready_made_spec_lists(variant):
    p = tiny_sd3_pipeline(variant, num_layers=3)
    skips = skip_each_layer(p)
    assert [s.layers for s in skips] == [(0,), (1,), (2,)] and skip_each_layer(p, mode="attention")[1].mode == "attention"
    assert [z.layers for z in zero_text_each_layer(p)] == [(0,), (1,), (2,)]
    ko = knock_out_each_quadrant(p)
    assert [(k.layers[0], k.quadrant) for k in ko] == [(i, q) for i in range(3) for q in QUADRANTS]
    assert len({k.describe() for k in ko}) == 12 and len(ablate_each_head(p, layers=[1])) == 4
    df = sweep(p, PROMPTS[:1], skips[2:], metrics=[mse], progress=False, **CALL)
    assert len(df) == 1 and df.value.item() > 0 and df.step.isna().all()
