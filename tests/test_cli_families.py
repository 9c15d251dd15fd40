"""``mmdit-probe record --model FOLDER`` on a saved folder of every non-SD3 family: the results file holds what the
library records for the same call (the CLI adds nothing and loses nothing), with the pipeline's own call defaults."""

from __future__ import annotations

import pytest
import torch

import mmdit_probe as mp
from mmdit_probe import cli
from mmdit_probe.models import load_pipeline

FAMILIES = {"flux": "tiny_flux_pipeline", "chroma": "tiny_chroma_pipeline", "qwen_image": "tiny_qwen_image_pipeline",
            "flux2": "tiny_flux2_pipeline"}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_record_a_saved_folder_equals_the_library(family, tmp_path):
    folder = tmp_path / family
    getattr(mp, FAMILIES[family])().save_pretrained(folder)
    out = tmp_path / "run.safetensors"
    argv = ["record", "a red circle", "--model", str(folder), "--steps", "2", "--height", "32", "--width", "40",
            "--words", "--no-progress", "--out", str(out)]
    assert cli.main(argv) == 0
    got = mp.AttentionResult.load(out)
    pipe = load_pipeline(str(folder))
    pipe.set_progress_bar_config(disable=True)
    with mp.AttentionRecorder(pipe, words=True) as rec:
        pipe(prompt="a red circle", num_inference_steps=2, height=32, width=40, generator=torch.Generator().manual_seed(0))
    ref = rec.result
    assert got.branches == ref.branches and got.image_grid == ref.image_grid
    for name in ("mass", "word_map"):  # bitwise, NaN where nothing was recorded (e.g. words absent from a row)
        assert torch.allclose(got.stat(name).values, ref.stat(name).values, rtol=0, atol=0, equal_nan=True)
    assert got.meta["run"]["steps"] == 2 and got.layouts[0].text == ref.layouts[0].text
