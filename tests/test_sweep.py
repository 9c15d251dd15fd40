"""Tests for mmdit_probe.sweep: long-form table, one baseline per (prompt, seed), crash-safe resume."""

from __future__ import annotations

import json
import re

import pandas as pd
import torch
import pytest

from mmdit_probe.ablate import AblationError
from mmdit_probe.ablate import KnockOut, SkipLayers, ZeroText
from mmdit_probe.effect import mse, run_with_effects
from mmdit_probe.maps import QUADRANTS
from mmdit_probe.models import tiny_sd3_pipeline
from mmdit_probe.sweep import (COLUMNS, SweepFileError, SweepSettingsError, ablate_each_head, knock_out_each_quadrant,
                               skip_each_layer, sweep, zero_text_each_layer)

PROMPTS = ["a red circle", "a blue square"]
CALL = dict(num_inference_steps=2, height=32, width=32, max_sequence_length=16, guidance_scale=5.0)
N_METRIC_ROWS = 6 + 3 * CALL["num_inference_steps"]  # latent/image x (mse, psnr, cosine) + velocity per step


@pytest.fixture(scope="module")
def pipe():
    return tiny_sd3_pipeline("sd3")


class CallCounter:
    """Counts transformer calls (each pipeline run makes num_inference_steps of them)."""

    def __init__(self, pipe, crash_at: int | None = None):
        self.n, self.crash_at = 0, crash_at
        self.handle = pipe.transformer.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        self.n += 1
        if self.n == self.crash_at:
            raise RuntimeError("simulated crash")

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
    counter = CallCounter(pipe, crash_at=5)  # baseline and spec 0 of prompt 0 (4 calls), then spec 1 crashes
    try:
        with pytest.raises(RuntimeError, match="simulated crash"):
            sweep(pipe, PROMPTS, good, seeds=[0], save_to=path, progress=False, **CALL)
        saved = pd.read_csv(path)
        assert set(saved.spec_index) == {0} and set(saved.prompt) == {PROMPTS[0]} and len(saved) == N_METRIC_ROWS
        counter.n, counter.crash_at = 0, None
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
    assert sorted(tmp_path.iterdir()) == [path, tmp_path / "sweep.settings.json"]  # no temporary files left behind


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
        with pytest.raises(ValueError, match="not a sweep table"):
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


# ---- resume never mixes experiments; the table is checked on read ----------------------------------------------
SMALL = dict(prompts=PROMPTS[:1], specs=[SkipLayers([0]), SkipLayers([2])])


@pytest.fixture(scope="module")
def finished(pipe, tmp_path_factory):
    """A finished small sweep: (folder, table path, its DataFrame)."""
    folder = tmp_path_factory.mktemp("finished")
    df = sweep(pipe, SMALL["prompts"], SMALL["specs"], seeds=[0], save_to=folder / "s.csv", progress=False, **CALL)
    return folder, df


@pytest.fixture
def table(finished, tmp_path):
    """A fresh copy of the finished sweep's table and settings: the table's path."""
    import shutil

    shutil.copytree(finished[0], tmp_path / "copy")
    return tmp_path / "copy" / "s.csv"


def _again(pipe, path, seeds=(0,), **kw):
    return sweep(pipe, SMALL["prompts"], SMALL["specs"], seeds=seeds, save_to=path, progress=False, **{**CALL, **kw})


def test_settings_file_records_the_sweep(table, finished):
    import json

    s = json.loads((table.parent / "s.settings.json").read_text())
    assert s["format"] == "mmdit_probe.sweep" and s["version"] == 1 and s["table"] == "s.csv"
    assert s["prompts"] == SMALL["prompts"] and s["seeds"] == [0] and s["specs"] == ["skip block 0", "skip block 2"]
    assert s["call"] == CALL and s["transformer_calls"] == 2 and s["model"].startswith("StableDiffusion3Pipeline:")
    assert [m["name"] for m in s["metrics"]][:2] == ["latent_mse", "latent_psnr"] and s["mmdit_probe"]


@pytest.mark.parametrize("change, setting", [
    (dict(num_inference_steps=3), "call.num_inference_steps"),
    (dict(guidance_scale=1.0), "call.guidance_scale"),
    (dict(height=64, width=64), "call.height"),
    (dict(metrics=[mse]), "metrics"),
    (dict(specs=[SkipLayers([0]), ZeroText(layers=[2])]), "specs"),
    (dict(seeds=[1]), "seeds"),  # drops seed 0: only adding is allowed
    (dict(settings={"kind": "zero-text"}), "extra.kind"),
])
def test_resume_with_other_settings_is_refused(pipe, table, change, setting):
    before = table.read_bytes()
    specs = change.pop("specs", SMALL["specs"])
    seeds = change.pop("seeds", [0])
    counter = CallCounter(pipe)
    try:
        with pytest.raises(SweepSettingsError, match=re.escape(setting)) as info:
            sweep(pipe, SMALL["prompts"], specs, seeds=seeds, save_to=table, progress=False, **{**CALL, **change})
    finally:
        counter.close()
    assert counter.n == 0 and table.read_bytes() == before and str(table) in str(info.value)
    assert "another save_to" in str(info.value) and info.value.differences[0][0] == setting


def test_resume_with_other_weights_or_version_is_refused(table, monkeypatch):
    other = tiny_sd3_pipeline("sd3")
    with torch.no_grad():
        other.transformer.pos_embed.proj.weight.view(-1)[0] += 1.0
    with pytest.raises(SweepSettingsError, match="model"):
        _again(other, table)
    import mmdit_probe

    monkeypatch.setattr(mmdit_probe, "__version__", "99.0")
    with pytest.raises(SweepSettingsError, match="mmdit_probe: '0.1.0' recorded, '99.0' now"):
        _again(other, table)


def test_adding_seeds_extends_the_sweep(pipe, table, finished):
    counter = CallCounter(pipe)
    try:
        df = _again(pipe, table, seeds=[0, 1])
    finally:
        counter.close()
    assert counter.runs == 1 + 2  # only seed 1: its baseline and two specs
    pd.testing.assert_frame_equal(df[df.seed == 0].reset_index(drop=True), finished[1])
    assert list(df.seed.unique()) == [0, 1] and len(df) == 2 * 2 * N_METRIC_ROWS
    assert json.loads((table.parent / "s.settings.json").read_text())["seeds"] == [0, 1]


def test_missing_metric_rows_are_redone(pipe, table, finished):
    rows = table.read_text().splitlines(keepends=True)
    hole = next(i for i, r in enumerate(rows) if ",skip block 2,1,image_psnr," in r)
    table.write_text("".join(rows[:hole] + rows[hole + 1:]))
    counter = CallCounter(pipe)
    try:
        with pytest.warns(UserWarning, match="1 run.* incomplete .*spec_index 1: missing image_psnr"):
            df = _again(pipe, table)
    finally:
        counter.close()
    assert counter.runs == 1 + 1  # the baseline and spec 1, nothing else
    pd.testing.assert_frame_equal(df, finished[1])
    assert table.read_text() == "".join(rows)


def test_truncated_last_line_is_dropped_and_its_run_redone(pipe, table, finished):
    text = table.read_text()
    n_lines = text.count("\n")
    table.write_text(text[:-7])  # cut inside the last row
    counter = CallCounter(pipe)
    try:
        with pytest.warns(UserWarning) as seen:
            df = _again(pipe, table)
    finally:
        counter.close()
    said = [str(w.message) for w in seen]
    assert f"line {n_lines} is cut off" in said[0] and "spec_index 1: missing velocity_cosine steps" in said[1]
    assert counter.runs == 1 + 1
    pd.testing.assert_frame_equal(df, finished[1])


def _edit(path, line, old, new):
    lines = path.read_text().splitlines(keepends=True)
    assert old in lines[line - 1], lines[line - 1]
    lines[line - 1] = lines[line - 1].replace(old, new, 1)
    path.write_text("".join(lines))


@pytest.mark.parametrize("damage, message", [
    (lambda p: p.write_bytes(b""), "is empty"),
    (lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe"), "not UTF-8"),
    (lambda p: p.write_text("prompt,seed\n"), "not a sweep table: line 1 has the columns"),
    (lambda p: _edit(p, 3, "latent_psnr,,", "latent_psnr,,abc"), "line 3: value 'abc.*' is not a number"),
    (lambda p: _edit(p, 2, "a red circle,0,", "a red circle,zero,"), "line 2: seed 'zero' is not a whole number"),
    (lambda p: _edit(p, 2, "a red circle,0,", "a green circle,0,"), "line 2: prompt 'a green circle' is not one"),
    (lambda p: _edit(p, 4, "skip block 0", "skip block 1"), "line 4: spec 'skip block 1' at spec_index 0"),
    (lambda p: _edit(p, 2, "latent_mse,", "latent_l1,"), "line 2: metric 'latent_l1'"),
    (lambda p: _edit(p, 2, "latent_mse,,", "latent_mse,3,"), "line 2: step '3' on the final-output metric"),
    (lambda p: p.write_text(p.read_text() + p.read_text().splitlines(keepends=True)[5]),
     f"line {2 * N_METRIC_ROWS + 2} repeats line 6"),
    (lambda p: p.write_text(p.read_text() + "a,b\n"), "has 2 fields, expected 7"),
    (lambda p: p.write_text(p.read_text() + '"open quote,1\n'), "is not valid CSV"),
    (lambda p: p.with_name("s.settings.json").write_text("{not json"), "s.settings.json is not a sweep settings"),
    (lambda p: p.with_name("s.settings.json").unlink(), "has no settings file s.settings.json"),
])
def test_unreadable_tables_are_refused_naming_the_file(pipe, table, damage, message):
    damage(table)
    with pytest.raises(SweepFileError, match=message) as info:
        _again(pipe, table)
    assert str(table.parent) in str(info.value)


def test_repeated_seeds_or_prompts_are_refused(pipe):
    with pytest.raises(ValueError, match="seeds given more than once"):
        sweep(pipe, PROMPTS, [SkipLayers([0])], seeds=[0, 0], **CALL)
    with pytest.raises(ValueError, match="prompts given more than once"):
        sweep(pipe, PROMPTS * 2, [SkipLayers([0])], **CALL)


def test_failed_runs_are_reported_then_redone(pipe, tmp_path, capsys):
    path, specs = tmp_path / "f.csv", [SkipLayers([0]), SkipLayers([1]), SkipLayers([2])]
    with pytest.raises(ValueError, match="on_error must be one of"):
        sweep(pipe, PROMPTS, specs, on_error="ignore", **CALL)
    counter = CallCounter(pipe, crash_at=5)  # baseline and spec 0 (4 calls), then spec 1 crashes
    try:
        df = sweep(pipe, PROMPTS[:1], specs, save_to=path, on_error="continue", **CALL)
        report = df.attrs["sweep_report"]
        assert (report["ran"], report["skipped"], report["failed"]) == (2, 0, 1) and set(df.spec_index) == {0, 2}
        assert report["failures"][0][:3] == [PROMPTS[0], 0, 1] and "simulated crash" in report["failures"][0][3]
        err = capsys.readouterr().err
        assert "3 runs (1 prompts x 1 seeds x 3 specs): 2 run now, 0 skipped (finished before), 1 failed" in err
        assert f"failed: prompt {PROMPTS[0]!r}, seed 0, spec_index 1: RuntimeError: simulated crash" in err
        counter.n = 0  # resume, adding a prompt whose baseline crashes (call 5)
        df = sweep(pipe, PROMPTS, specs, save_to=path, on_error="continue", progress=False, **CALL)
        report = df.attrs["sweep_report"]
        assert counter.runs == 1 + 1 + 0.5  # prompt 0: baseline + spec 1; prompt 1: the baseline's first step
        assert (report["ran"], report["skipped"], report["failed"]) == (1, 2, 3)
        assert [f[:3] for f in report["failures"]] == [[PROMPTS[1], 0, i] for i in range(3)]
        assert all("the baseline failed: RuntimeError: simulated crash" in f[3] for f in report["failures"][1:])
        counter.crash_at = None
        df = sweep(pipe, PROMPTS, specs, save_to=path, progress=False, **CALL)
    finally:
        counter.close()
    assert (df.attrs["sweep_report"]["ran"], df.attrs["sweep_report"]["skipped"]) == (3, 3)
    fresh = sweep(pipe, PROMPTS, specs, progress=False, **CALL)
    pd.testing.assert_frame_equal(df, fresh)
