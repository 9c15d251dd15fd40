"""Results save/load without pickle, atomically, and fail clearly on damaged files."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import mmdit_probe as mp
import mmdit_probe.io as mio


@pytest.fixture(scope="module")
def result():
    pipe = mp.tiny_sd3_pipeline("sd35", seed=2)
    maps = [mp.MapSelection("text->image", layers=[0], heads=[0, 2]), mp.MapSelection("image->image", attention="attn2", steps=[1])]
    with mp.AttentionRecorder(pipe, groups=True, words=True, word_heads="mean", entropy=True, key_mass=True, maps=maps) as rec:
        pipe("a red circle above a blue square", num_inference_steps=2, height=24, width=32, max_sequence_length=10,
             guidance_scale=3.0, output_type="latent")
    return rec.result


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(torch.isnan(a), torch.isnan(b)) and torch.equal(a.nan_to_num(), b.nan_to_num())


def test_round_trip(result, tmp_path):
    path = result.save(tmp_path / "run.safetensors")
    back = mp.AttentionResult.load(path)
    assert set(back.stats) == set(result.stats) == {"mass", "group_mass", "word_map", "entropy", "key_mass"}
    for name, st in result.stats.items():
        b = back.stats[name]
        assert _same(st.values, b.values) and b.dims == st.dims
        assert {k: tuple(v) for k, v in b.coords.items()} == {k: tuple(v) for k, v in st.coords.items()}
        assert b.aux == st.aux
    assert set(back.maps) == set(result.maps) and len(back.maps) == 2 + len(result.meta["dual_attention_layers"])
    for k in result.maps:
        assert torch.equal(back.maps[k], result.maps[k]) and back.map_meta[k] == result.map_meta[k]
    assert back.layouts == result.layouts and back.meta == result.meta
    assert back.to_dataframe().equals(result.to_dataframe())
    assert _same(back.word_map("red"), result.word_map("red"))
    assert torch.isnan(result.word_map("red")[0]).all() and not torch.isnan(result.word_map("red")[1]).any()
    assert back.word_map("red").shape == (2, 6, 8)  # head mean was recorded
    # the file is plain safetensors with a JSON header: no pickle anywhere
    with safe_open(path, framework="pt") as fh:
        header = json.loads(fh.metadata()["mmdit_probe"])
    assert header["format"] == "mmdit_probe.result"
    with open(path, "rb") as fh:
        assert b"\x80\x04" not in fh.read(64)


def test_atomic_save_keeps_old_file_on_failure(result, tmp_path, monkeypatch):
    path = tmp_path / "run.safetensors"
    result.save(path)
    before = path.read_bytes()

    def broken(tensors, filename, metadata=None):
        with open(filename, "wb") as fh:
            fh.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(mio, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        result.save(path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["run.safetensors"]


def test_corrupt_truncated_and_foreign_files(result, tmp_path):
    good = tmp_path / "good.safetensors"
    result.save(good)
    data = good.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file at all")
    for p in (truncated, garbage):
        with pytest.raises(mp.ResultsFileError, match="record the run again"):
            mp.AttentionResult.load(p)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"x": torch.zeros(2)}, str(foreign))
    with pytest.raises(mp.ResultsFileError, match="not a readable mmdit_probe results file|not an mmdit_probe result"):
        mp.AttentionResult.load(foreign)
    with pytest.raises(FileNotFoundError, match="result.save"):
        mp.AttentionResult.load(tmp_path / "missing.safetensors")
    # the good file is still readable after all that
    assert _same(mp.AttentionResult.load(good).mass.values, result.mass.values)
