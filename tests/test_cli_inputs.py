"""`mmdit-probe`: every user mistake is a one-line error (exit 2) found before the model loads, never a
traceback; `--debug` shows it; a run that recorded only NaN says so."""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import pytest
import torch

import mmdit_probe as mp
import mmdit_probe.models
import mmdit_probe.shapes
from mmdit_probe import cli
from mmdit_probe.cli import commands

TINY = ["--model", "tiny", "--steps", "2", "--no-progress"]


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture
def no_model(monkeypatch):
    """Loading any model fails the test: the check under test must come first."""

    def loaded(*args, **kwargs):
        raise AssertionError("the model was loaded before the inputs were checked")

    monkeypatch.setattr(mmdit_probe.models, "load_pipeline", loaded)
    monkeypatch.setattr(mmdit_probe.shapes, "default_pipeline", loaded)
    monkeypatch.setattr(mmdit_probe.shapes, "shapes_pipeline", loaded)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """A results file recorded with --words (and its image next to it)."""
    path = tmp_path_factory.mktemp("rec") / "r.safetensors"
    assert cli.main(["record", "a red circle", "-o", str(path), "--words", *TINY]) == 0
    return path


def _one_error(capsys, command: str, *needles: str) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith(f"mmdit-probe {command}: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], (needle, err)
    return lines[0]


def _unwritable(tmp_path: Path) -> Path:
    """A folder nobody may create files in (root ignores modes, so /proc then)."""
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        return Path("/proc/mmdit-probe-test")
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    return folder


# ---- devices ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv", [["record", "x"], ["demo"], ["sweep", "--seeds", "0"], ["describe", "tiny"]])
@pytest.mark.parametrize("device, message", [("foo", "unknown --device 'foo'"),
                                             ("cuda", "--device cuda: no cuda device is available")])
def test_unusable_device(argv, device, message, capsys, tmp_path, monkeypatch, no_model):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a CPU machine, even on a GPU one
    assert cli.main(argv + ["--device", device, "--model", "tiny"]) == 2
    _one_error(capsys, argv[0], message)


# ---- output paths ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["plot", "demo", "sweep"])
def test_out_is_an_existing_file(command, results, capsys, tmp_path, no_model):
    taken = tmp_path / "taken"
    taken.write_text("not a folder")
    argv = {"plot": ["plot", str(results)], "demo": ["demo", *TINY], "sweep": ["sweep", "--seeds", "0", *TINY]}
    assert cli.main(argv[command] + ["--out", str(taken)]) == 2
    _one_error(capsys, command, str(taken), "is a file")
    assert taken.read_text() == "not a folder"


def test_record_out_checked_before_the_model_loads(capsys, tmp_path, no_model):
    folder = tmp_path / "a.safetensors"
    folder.mkdir()
    assert cli.main(["record", "x", "-o", str(folder), *TINY]) == 2
    _one_error(capsys, "record", "is a folder")
    (tmp_path / "file").write_text("")
    assert cli.main(["record", "x", "-o", str(tmp_path / "file" / "sub" / "r.safetensors"), *TINY]) == 2
    _one_error(capsys, "record", "is a file, not a folder")
    (tmp_path / "b_image.png").mkdir()  # the image written next to the results file
    assert cli.main(["record", "x", "-o", str(tmp_path / "b.safetensors"), *TINY]) == 2
    _one_error(capsys, "record", "b_image.png", "is a folder")
    locked = _unwritable(tmp_path)
    assert cli.main(["record", "x", "-o", str(locked / "r.safetensors"), *TINY]) == 2
    _one_error(capsys, "record", "cannot write in")


def test_describe_output_checked_before_the_model_loads(capsys, tmp_path, no_model):
    assert cli.main(["describe", "tiny", "-o", str(tmp_path)]) == 2
    _one_error(capsys, "describe", "--output", "is a folder")


def test_plot_image_that_is_not_an_image(results, capsys, tmp_path):
    fake = tmp_path / "fake.png"
    fake.write_text("this is text")
    for given, message in ((fake, "is not an image file"), (tmp_path / "none.png", "does not exist")):
        assert cli.main(["plot", str(results), "--out", str(tmp_path / "figs"), "--image", str(given)]) == 2
        _one_error(capsys, "plot", "--image", str(given), message)
    assert not (tmp_path / "figs").exists()


# ---- numbers ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, message", [
    (["record", "x", "--seed", str(2**80)], "--seed: expected an integer from 0 to 18446744073709551615"),
    (["record", "x", "--seed", "-1"], "--seed: expected an integer from 0"),
    (["sweep", "--seeds", "0", str(2**64)], "--seeds: expected an integer from 0 to"),
    (["record", "x", "--steps", str(10**9)], "--steps: expected a positive integer from 1 to 10000"),
    (["record", "x", "--height", "0"], "--height: expected a positive integer"),
    (["record", "x", "--max-sequence-length", "9999"], "from 1 to 512"),
    (["record", "x", "--guidance", "nan"], "--guidance: expected a finite number"),
    (["sweep", "--strip", "-1"], "--strip: expected an integer from 0 to 64"),
    (["sweep", "--seeds", "3", "3"], "--seeds: [3] given more than once"),
    (["record", "x", "--maps", "image->text:5-3"], "bad layer list '5-3'"),
    (["record", "x", "--maps", "image->text:0:-1"], "bad step list '-1'"),
])
def test_integer_ranges_checked_before_the_model_loads(argv, message, capsys, tmp_path, monkeypatch, no_model):
    monkeypatch.chdir(tmp_path)
    assert cli.main(argv + ["--model", "tiny"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and "Overflow" not in err, err


def test_maps_that_select_no_step(capsys, tmp_path, no_model):
    out = tmp_path / "m.safetensors"
    assert cli.main(["record", "x", "-o", str(out), "--maps", "image->text:0:99", *TINY]) == 2
    _one_error(capsys, "record", "--maps 'image->text:0:99'", "[99]", "the run has 2 steps")
    assert not out.exists()


def test_maps_checked_against_the_model_default_steps(capsys, tmp_path):
    out = tmp_path / "m.safetensors"  # no --steps: the tiny model's 8 steps, known once it loads (before the run)
    argv = ["record", "x", "-o", str(out), "--model", "tiny", "--maps", "image->text:0:7,8", "--no-progress"]
    assert cli.main(argv) == 2
    _one_error(capsys, "record", "[8]", "the run has 8 steps")
    assert not out.exists()


# ---- --debug, internal errors, warnings ------------------------------------------------------------------------
def test_debug_shows_the_traceback(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(cli.CLIError, match="unknown --device"):
        cli.main(["--debug", "record", "x", "--device", "foo"])
    with pytest.raises(cli.CLIError, match="unknown --device"):
        cli.main(["record", "x", "--device", "foo", "--debug"])


def test_internal_error_is_one_line_unless_debug(capsys):
    def broken(args):
        raise RuntimeError("a bug\nover two lines")

    cli.register_subcommand("broken-test", lambda p: None, broken, help="fails")
    try:
        assert cli.main(["broken-test"]) == 1
        line = _one_error(capsys, "broken-test", "internal error (RuntimeError: a bug over two lines)", "--debug")
        assert line.endswith("report it")
        with pytest.raises(RuntimeError, match="a bug"):
            cli.main(["--debug", "broken-test"])
    finally:
        cli.SUBCOMMANDS.pop("broken-test", None)


def test_warnings_are_one_line(capsys):
    import warnings

    def warns(args):
        warnings.warn("careful\nnow", UserWarning)

    cli.register_subcommand("warns-test", lambda p: None, warns, help="warns")
    try:
        assert cli.main(["warns-test"]) == 0
        err = capsys.readouterr().err
        assert err.startswith("mmdit-probe warns-test: warning: careful") and "warnings.warn" not in err, err
    finally:
        cli.SUBCOMMANDS.pop("warns-test", None)


# ---- recorded NaN is not "not recorded" ------------------------------------------------------------------------
def test_all_nan_recording_is_reported(capsys, tmp_path, monkeypatch):
    load = commands.get_pipeline

    def nan_model(*args, **kwargs):
        pipe = load(*args, **kwargs)
        with torch.no_grad():
            pipe.transformer.pos_embed.proj.weight.fill_(float("nan"))
        return pipe

    monkeypatch.setattr(commands, "get_pipeline", nan_model)
    path = tmp_path / "nan.safetensors"
    assert cli.main(["record", "x", "-o", str(path), *TINY]) == 0
    err = capsys.readouterr().err
    assert "mmdit-probe record: warning: every recorded attention mass is NaN" in err and "Traceback" not in err, err
    assert mp.AttentionResult.load(path).mass.values.isnan().all()
    assert cli.main(["show", str(path)]) == 0
    assert "mmdit-probe show: warning: every recorded attention mass is NaN" in capsys.readouterr().err
