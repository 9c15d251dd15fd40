"""`mmdit-probe` in-process: demo, record/show/plot round trip, errors without tracebacks, extra subcommands,
complete help, no warnings."""

from __future__ import annotations

import re
import subprocess
import sys

import matplotlib

matplotlib.use("Agg")

import pandas as pd
import pytest

import mmdit_probe as mp
from mmdit_probe import cli
from mmdit_probe.shapes import default_pipeline, default_run_kwargs


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
        err = capsys.readouterr().err  # the ResultsFileError's own wording (io.py), whatever it is: one line
        assert err.startswith(f"mmdit-probe {cmd}: error: ") and str(bad) in err, err
        assert err.count("\n") == 1 and "Traceback" not in err, err


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
    pipe = default_pipeline()
    kw = default_run_kwargs(pipe)
    assert set(kw) == {"num_inference_steps", "guidance_scale", "max_sequence_length"}
    assert hasattr(pipe, "transformer") and kw == pipe.shipped_run_kwargs


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


def _sweep_argv(out, *extra):
    return ["sweep", "--model", "tiny", "--steps", "2", "--seeds", "0", "--out", str(out), "--strip", "0",
            "--no-progress", *extra]


@pytest.fixture
def swept(tmp_path, capsys):
    """A finished skip-layers sweep made with --seeds 0 --steps 2: its folder."""
    out = tmp_path / "sweep"
    assert cli.main(_sweep_argv(out)) == 0
    capsys.readouterr()
    return out


@pytest.mark.parametrize("change, named", [
    (["--seeds", "0", "1", "--steps", "3"], "--steps: 2 recorded, 3 now"),
    (["--kind", "zero-text"], "--kind: 'skip-layers' recorded, 'zero-text' now"),
    (["--model", "tiny-sd35"], "--model: 'tiny' recorded, 'tiny-sd35' now"),
    (["--prompt", "a blue square"], "--prompt: "),  # replaces the default prompt: only adding is allowed
    (["--guidance", "1"], "--guidance: 5.0 recorded, 1.0 now"),
])
def test_sweep_resume_with_other_settings_is_refused(swept, change, named, capsys, monkeypatch):
    before = (swept / "sweep.csv").read_bytes()
    import mmdit_probe.models

    monkeypatch.setattr(mmdit_probe.models, "load_pipeline", lambda *a, **k: pytest.fail("model loaded"))
    assert cli.main(_sweep_argv(swept, "--resume", *change)) == 2
    err = capsys.readouterr().err
    assert err.startswith("mmdit-probe sweep: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert named in err and f"--out {swept}-2" in err and str(swept) in err, err
    assert (swept / "sweep.csv").read_bytes() == before


def test_sweep_resume_checks_resolved_defaults_too(swept, capsys):
    """--steps left out: the tiny model's default (8) is not the recorded 2, found once the model loads."""
    argv = [a for a in _sweep_argv(swept, "--resume") if a not in ("--steps", "2")]
    assert cli.main(argv) == 2
    assert "--steps: 2 recorded, 8 now" in capsys.readouterr().err


def test_sweep_resume_adds_seeds(swept, capsys):
    assert cli.main(_sweep_argv(swept, "--resume", "--seeds", "0", "1")) == 0
    df = pd.read_csv(swept / "sweep.csv")
    assert sorted(df.seed.unique()) == [0, 1] and not df.duplicated(["seed", "spec_index", "metric", "step"]).any()
    assert "settings" in capsys.readouterr().out


def test_sweep_damaged_table_is_one_line(swept, capsys):
    csv = swept / "sweep.csv"
    text = csv.read_text()
    csv.write_text(text[:-5])  # cut mid-row: repaired with a warning, the run done again
    assert cli.main(_sweep_argv(swept, "--resume")) == 0
    err = capsys.readouterr().err
    assert f"mmdit-probe sweep: warning: {csv}: line {text.count(chr(10))} is cut off" in err, err
    assert csv.read_text() == text
    for damage, message in (("", "is empty"), (text.replace("latent_psnr,,", "latent_psnr,,x", 1), "is not a number"),
                            (text + text.splitlines(keepends=True)[1], "repeats line 2")):
        csv.write_text(damage)
        assert cli.main(_sweep_argv(swept, "--resume")) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"mmdit-probe sweep: error: {csv}") and message in err and "Traceback" not in err, err


# ----------------------------------------------------------------------------------- help and messages

OPTION_COMMANDS = DESCRIPTION_COMMANDS = list(cli.SUBCOMMANDS)


def _help(capsys, name: str) -> str:
    capsys.readouterr()
    assert cli.main([name, "--help"]) == 0
    return capsys.readouterr().out


def _option_helps(text: str) -> dict[str, str]:
    """``{"--steps STEPS": "denoising steps ..."}`` for every argument listed in argparse's help output."""
    out: dict[str, str] = {}
    entries = text.split("\n\n", 1)[-1]  # after the usage block
    key = None
    for line in entries.splitlines():
        head = re.match(r"^  (\S.*?)(?:\s{2,}(\S.*))?$", line)
        if head and not line.startswith("   "):
            key = head.group(1)
            out[key] = head.group(2) or ""
        elif key is not None and line.startswith(" " * 6) and line.strip():
            out[key] = (out[key] + " " + line.strip()).strip()
        elif not line.startswith(" "):
            key = None
    return out


@pytest.mark.parametrize("name", OPTION_COMMANDS)
def test_every_option_has_help_and_one_default(name, capsys):
    text = _help(capsys, name)
    helps = {k: v for k, v in _option_helps(text).items() if not k.startswith("-h, --help")}
    assert helps, text
    missing = [k for k, v in helps.items() if not v]
    assert not missing, f"{name}: options without help text: {missing}"
    for option, help_ in helps.items():
        defaults = re.findall(r"\(default\b|\bdefault:", help_)
        assert len(defaults) <= 1, f"{name} {option}: default stated twice: {help_!r}"
        assert "(default: None)" not in help_ and "(default: False)" not in help_, (option, help_)


@pytest.mark.parametrize("name", DESCRIPTION_COMMANDS)
def test_description_is_complete_sentences(name, capsys):
    text = _help(capsys, name)
    description = " ".join(text.split("\n\n")[1].split())
    assert not description.startswith(("options:", "positional arguments:")), text
    assert description.endswith((".", "?", "!", ")")), f"{name}: description stops mid-sentence: {description!r}"


def test_import_and_help_emit_no_warnings():
    """Warnings are errors and nothing may reach stderr (transformers' torchvision notes are log records)."""
    script = ("import contextlib, io\nimport mmdit_probe\nfrom mmdit_probe import cli\n"
              "for name in [None, *cli.SUBCOMMANDS]:\n"
              "    with contextlib.redirect_stdout(io.StringIO()):\n"
              "        assert cli.main(([name] if name else []) + ['--help']) == 0, name\n")
    done = subprocess.run([sys.executable, "-W", "error", "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stderr == "", done.stderr


def test_loading_a_folder_with_dtype_is_quiet(tmp_path):
    """No torch_dtype deprecation and no torchvision note when a command loads real weights (--model DIR --dtype)."""
    mp.tiny_sd3_pipeline().save_pretrained(tmp_path / "tiny")
    done = subprocess.run([sys.executable, "-W", "always", "-m", "mmdit_probe", "describe", "--model",
                           str(tmp_path / "tiny"), "--dtype", "bfloat16", "--format", "csv"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    for noise in ("Warning", "deprecated", "torchvision"):
        assert noise not in done.stderr, done.stderr
    assert "T5 length" in done.stdout


@pytest.mark.parametrize("argv", [
    ["record", "x", "--model", "stabilityai/stable-diffusion-3.5-medium"],
    ["describe", "stabilityai/stable-diffusion-3.5-medium"],
    ["describe", "--model", "./no/such/model"],
])
def test_missing_weights_error_names_the_cli_flag(argv, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "--model /path/to/" in err and "--model tiny" in err, err
    assert "load_pipeline(" not in err and "tiny_sd3_pipeline" not in err and "Traceback" not in err, err


def test_describe_two_models_is_an_error(capsys):
    assert cli.main(["describe", "tiny", "--model", "tiny-sd35"]) == 2
    assert "give one" in capsys.readouterr().err
