"""`mmdit-probe` in-process: demo, record/show/plot round trip, errors without tracebacks, extra subcommands."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import pandas as pd
import pytest

import mmdit_probe as mp
from mmdit_probe import cli


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_help_lists_subcommands(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in ("demo", "record", "plot", "sweep", "show"):
        assert name in out
    for name in ("demo", "record", "plot", "sweep", "show"):
        assert cli.main([name, "--help"]) == 0
    out = capsys.readouterr().out
    assert "--maps QUADRANT:LAYERS:STEPS" in out and "--resume" in out and "--kind" in out


def test_demo(tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli.main(["demo", "--out", str(out), "--model", "tiny", "--steps", "2", "--no-progress"]) == 0
    for name in ("result.safetensors", "result_summary.csv", "quadrant_map.png", "word_maps.png", "result_image.png"):
        assert (out / name).stat().st_size > 0, name
    printed = capsys.readouterr().out
    assert "image->text" in printed and str(out / "quadrant_map.png") in printed
    table = pd.read_csv(out / "result_summary.csv", index_col=0)
    res = mp.AttentionResult.load(out / "result.safetensors")
    pd.testing.assert_frame_equal(table, res.quadrant_table().astype("float64"), check_names=False, check_exact=False, rtol=1e-6)
    assert res.timesteps and len(res.timesteps) == 2 and res.words


def test_record_show_plot_round_trip(tmp_path, capsys):
    path = tmp_path / "run" / "r.safetensors"
    argv = ["record", "a blue square", "-o", str(path), "--model", "tiny-sd35", "--steps", "2", "--groups",
            "--words", "--entropy", "--maps", "image->text:1,2:0", "--seed", "3", "--no-progress"]
    assert cli.main(argv) == 0
    res = mp.AttentionResult.load(path)
    assert set(res.stats) == {"mass", "group_mass", "word_map", "entropy"}
    assert sorted(res.maps) == [(0, 1, "attn", "image->text"), (0, 2, "attn", "image->text")]
    assert res.meta["run"]["prompt"] == "a blue square" and res.meta["run"]["seed"] == 3
    assert (tmp_path / "run" / "r_summary.csv").exists() and (tmp_path / "run" / "r_image.png").exists()
    capsys.readouterr()
    assert cli.main(["show", str(path)]) == 0
    shown = capsys.readouterr().out
    for text in ("group_mass", "attn2", "uncond", "cond", "blue", "image->text", "clip_real="):
        assert text in shown, text
    figs = tmp_path / "figs"
    assert cli.main(["plot", str(path), "--out", str(figs), "--quadrant", "text->image"]) == 0
    names = sorted(p.name for p in figs.iterdir())
    assert names == ["r_heads_text-image.png", "r_quadrant_map.png", "r_text_groups.png", "r_word_maps.png"]


@pytest.mark.parametrize("argv, message", [
    (["record"], "required: prompt"),
    (["record", "x", "--steps", "0"], "positive integer"),
    (["record", "x", "--maps", "image->sound:1"], "unknown quadrant"),
    (["record", "x", "--maps", "image->text:a-b"], "bad layer list"),
    (["record", "x", "-o", "r.txt"], ".safetensors"),
    (["record", "x", "--model", "./no/such/model"], "does not exist"),
    (["frobnicate"], "invalid choice"),
    (["show", "missing.safetensors"], "no results file"),
])
def test_bad_arguments_exit_2_with_message(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_corrupt_results_file(tmp_path, capsys):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00not a safetensors file")
    for cmd in ("show", "plot"):
        assert cli.main([cmd, str(bad)]) == 2
        err = capsys.readouterr().err
        assert "error:" in err and "not a readable mmdit_probe results file" in err and "Traceback" not in err


def test_register_extra_subcommand(capsys):
    seen = {}

    def add(p):
        p.add_argument("name")

    def run(args):
        seen["name"] = args.name
        return 0

    cli.register_subcommand("hello-test", add, run, help="say hello")
    try:
        assert cli.main(["hello-test", "world"]) == 0 and seen == {"name": "world"}
        with pytest.raises(ValueError, match="already registered"):
            cli.register_subcommand("hello-test", add, run)
        cli.register_subcommand("hello-test", add, lambda a: (_ for _ in ()).throw(cli.CLIError("boom")), replace=True)
        assert cli.main(["hello-test", "x"]) == 2 and "error: boom" in capsys.readouterr().err
    finally:
        cli.SUBCOMMANDS.pop("hello-test", None)


def test_default_pipeline_offline():
    pipe = cli.default_pipeline()
    kw = cli.default_run_kwargs(pipe)
    assert set(kw) == {"num_inference_steps", "guidance_scale", "max_sequence_length"}
    assert hasattr(pipe, "transformer")


def test_sweep_writes_table_and_figures_and_resumes(tmp_path, capsys):
    out = tmp_path / "sweep"
    argv = ["sweep", "--kind", "skip-layers", "--model", "tiny", "--steps", "2", "--seeds", "0", "--out", str(out),
            "--strip", "2", "--no-progress"]
    assert cli.main(argv) == 0
    df = pd.read_csv(out / "sweep.csv")
    assert list(df.columns) == ["prompt", "seed", "spec", "spec_index", "metric", "step", "value"]
    assert sorted(df.spec_index.unique()) == [0, 1, 2, 3]
    for name in ("effect_by_layer.png", "step_effects.png", "image_strip.png"):
        assert (out / name).stat().st_size > 0
    assert "skip block 0" in capsys.readouterr().out
    assert cli.main(argv) == 2 and "--resume" in capsys.readouterr().err  # refuses to overwrite
    df[df.spec_index < 2].to_csv(out / "sweep.csv", index=False)  # as if interrupted after two specs
    assert cli.main(argv + ["--resume", "--strip", "0"]) == 0
    again = pd.read_csv(out / "sweep.csv")
    assert len(again) == len(df) and sorted(again.spec_index.unique()) == [0, 1, 2, 3]
    assert cli.main(argv + ["--metric", "velocity_mse"]) == 2 and "unknown --metric" in capsys.readouterr().err
