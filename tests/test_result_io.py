"""Results files you can trust: save/load without pickle, atomically, checksummed, strictly validated."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save_file

import mmdit_probe as mp
import mmdit_probe.io as mio

V1_FIXTURE = Path(__file__).parent / "data" / "result_v1.safetensors"  # written by the version-1 release


@pytest.fixture(scope="module")
def result():
    pipe = mp.tiny_sd3_pipeline("sd35", seed=2)
    maps = [mp.MapSelection("text->image", layers=[0], heads=[0, 2]), mp.MapSelection("image->image", attention="attn2", steps=[1])]
    with mp.AttentionRecorder(pipe, groups=True, words=True, word_heads="mean", entropy=True, key_mass=True, maps=maps) as rec:
        pipe("a red circle above a blue square", num_inference_steps=2, height=24, width=32, max_sequence_length=10,
             guidance_scale=3.0, output_type="latent")
    return rec.result


@pytest.fixture
def good(result, tmp_path):
    return Path(result.save(tmp_path / "good.safetensors"))


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(torch.isnan(a), torch.isnan(b)) and torch.equal(a.nan_to_num(), b.nan_to_num())


def _parts(path) -> tuple[dict, dict, int]:
    """``(tensors, safetensors header, data offset)`` of a file, read with plain safetensors."""
    data = Path(path).read_bytes()
    n = int.from_bytes(data[:8], "little")
    return st_load(data), json.loads(data[8:8 + n]), 8 + n


def _rewrite(src, dst, edit) -> Path:
    """Copy ``src`` to ``dst`` with ``edit(header)`` applied and a valid checksum (where the release has one)."""
    tensors, st_header, _ = _parts(src)
    header = json.loads(st_header["__metadata__"]["mmdit_probe"])
    edit(header)
    text = json.dumps(header)
    meta = {"mmdit_probe": text}
    if hasattr(mio, "checksum"):
        meta["mmdit_probe.sha256"] = mio.checksum(text, tensors)
    save_file(tensors, str(dst), metadata=meta)
    return Path(dst)


def _flip(src: Path, dst: Path, at: int) -> Path:
    data = bytearray(src.read_bytes())
    data[at] ^= 0x01
    dst.write_bytes(bytes(data))
    return dst


def _no_warnings_load(path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return mp.AttentionResult.load(path)


# ---- round trip ---------------------------------------------------------------------------------
def test_round_trip_is_bitwise(result, good):
    back = _no_warnings_load(good)
    assert set(back.stats) == set(result.stats) == {"mass", "group_mass", "word_map", "entropy", "key_mass"}
    for name, st in result.stats.items():
        b = back.stats[name]
        assert _same(st.values, b.values) and b.dims == st.dims
        assert st.values.float().numpy().tobytes() == b.values.numpy().tobytes()  # bitwise, NaNs included
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
    # plain safetensors with a JSON header and a checksum: no pickle anywhere
    tensors, st_header, _ = _parts(good)
    header = json.loads(st_header["__metadata__"]["mmdit_probe"])
    assert header["format"] == "mmdit_probe.result" and header["version"] == mio.VERSION == 2
    assert st_header["__metadata__"]["mmdit_probe.sha256"] == mio.checksum(st_header["__metadata__"]["mmdit_probe"], tensors)
    assert b"\x80\x04" not in good.read_bytes()[:64]


def test_one_read_per_load(result, good, tmp_path, monkeypatch):
    """The file is read once: replacing it right after that read cannot mix two files."""
    other = tmp_path / "other.safetensors"
    result.sel(layer=[0]).save(other)
    real = Path.read_bytes
    reads = []

    def read_then_replace(self):
        data = real(self)
        reads.append(self)
        if self == good:
            os.replace(other, good)
        return data

    monkeypatch.setattr(Path, "read_bytes", read_then_replace)
    back = mp.AttentionResult.load(good)
    assert reads == [good]
    assert _same(back.mass.values, result.mass.values)  # all of the first file, none of the second


# ---- damage -------------------------------------------------------------------------------------
def test_flipped_byte_in_tensor_data(good, tmp_path):
    _, st_header, start = _parts(good)
    spots = [start + off[0] for name, v in st_header.items() if name != "__metadata__" for off in [v["data_offsets"]]]
    spots += [start + (good.stat().st_size - start) // 2, good.stat().st_size - 1]
    assert len(spots) >= 7
    for at in spots:  # the first byte of every tensor, one in the middle, the last byte of the file
        with pytest.raises(mp.ResultsFileError, match="checksum missing or wrong.*record the run again"):
            mp.AttentionResult.load(_flip(good, tmp_path / "bad.safetensors", at))


def test_flipped_byte_in_header(good, tmp_path):
    data = good.read_bytes()
    _, _, start = _parts(good)
    prompt_at = data.index(b"red circle", 0, start)  # a flip here leaves valid JSON with a different prompt
    for at in [prompt_at, *range(0, start, max(1, start // 150))]:
        with pytest.raises(mp.ResultsFileError):
            mp.AttentionResult.load(_flip(good, tmp_path / "bad.safetensors", at))


def test_truncated_file(good, tmp_path):
    data = good.read_bytes()
    _, _, start = _parts(good)
    for n in (0, 4, 8, 100, start // 2, start, (start + len(data)) // 2, len(data) - 1):
        bad = tmp_path / "truncated.safetensors"
        bad.write_bytes(data[:n])
        with pytest.raises(mp.ResultsFileError, match="not a readable safetensors file.*record the run again"):
            mp.AttentionResult.load(bad)
    assert _same(mp.AttentionResult.load(good).mass.values, mp.AttentionResult.load(good).mass.values)


@pytest.mark.parametrize("version", ["abc", None, 0, 1.5, True, "2"])
def test_invalid_version(good, tmp_path, version):
    bad = _rewrite(good, tmp_path / "bad.safetensors", lambda h: h.update(version=version))
    with pytest.raises(mp.ResultsFileError, match="invalid results format version.*record the run again"):
        mp.AttentionResult.load(bad)


def test_newer_version_refused_with_upgrade_hint(good, tmp_path):
    bad = _rewrite(good, tmp_path / "new.safetensors", lambda h: h.update(version=999))
    with pytest.raises(mp.ResultsFileError, match="newer mmdit_probe.*version 999.*upgrade mmdit_probe"):
        mp.AttentionResult.load(bad)


def test_foreign_and_garbage_files(tmp_path):
    plain = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(2)}, str(plain))
    with pytest.raises(mp.ResultsFileError, match="not an mmdit_probe result.*another program"):
        mp.AttentionResult.load(plain)
    for header in ("[1, 2]", '{"format": "someone.else"}', "null"):
        other = tmp_path / "other.safetensors"
        save_file({"x": torch.zeros(2)}, str(other), metadata={"mmdit_probe": header})
        with pytest.raises(mp.ResultsFileError, match="not an mmdit_probe result"):
            mp.AttentionResult.load(other)
    save_file({"x": torch.zeros(2)}, str(other), metadata={"mmdit_probe": "{not json"})
    with pytest.raises(mp.ResultsFileError, match="not valid JSON"):
        mp.AttentionResult.load(other)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file at all")
    with pytest.raises(mp.ResultsFileError, match="not a readable safetensors file"):
        mp.AttentionResult.load(garbage)
    with pytest.raises(FileNotFoundError, match="result.save"):
        mp.AttentionResult.load(tmp_path / "missing.safetensors")


def _set(*keys, value):
    def edit(h):
        for k in keys[:-1]:
            h = h[k]
        h[keys[-1]] = value
    return edit


MALFORMED = {
    "stats not an object": (_set("stats", value=[]), "'stats'"),
    "dims not names": (_set("stats", "mass", "dims", value=[0, 1, 2, 3, 4, 5, 6]), "stats.mass.dims"),
    "dims repeated": (_set("stats", "mass", "dims", value=["step"] * 7), "stats.mass.dims"),
    "dims vs tensor": (_set("stats", "entropy", "dims", value=["step", "layer"]), "does not match dims"),
    "coords length": (_set("stats", "mass", "coords", "layer", value=[0]), "stats.mass.coords.layer"),
    "coords not a list": (_set("stats", "mass", "coords", "layer", value="0123"), "stats.mass.coords.layer"),
    "coords not labels": (_set("stats", "mass", "coords", "step", value=[[0]]), "stats.mass.coords.step"),
    "coords of no dim": (_set("stats", "mass", "coords", "bogus", value=[1]), "stats.mass.coords.bogus"),
    "aux not a pair": (_set("stats", "mass", "aux", "timestep", value=["step"]), "stats.mass.aux.timestep"),
    "aux length": (_set("stats", "mass", "aux", "branch", value=["batch", ["cond"]]), "stats.mass.aux.branch"),
    "aux of no dim": (_set("stats", "mass", "aux", "branch", value=["bogus", [1, 2]]), "stats.mass.aux.branch"),
    "aux dim not a name": (_set("stats", "mass", "aux", "branch", value=[["batch"], [1, 2]]), "stats.mass.aux.branch"),
    "stat tensor missing": (_set("stats", "extra", value={"dims": ["x"]}), "stats.extra"),
    "map key of 3": (lambda h: h["maps"][0].update(key=h["maps"][0]["key"][:3]), r"maps\[0\].key"),
    "map key types": (lambda h: h["maps"][0].update(key=["0", 0, "attn", "text->image"]), r"maps\[0\].key"),
    "map key repeated": (lambda h: h["maps"][1].update(key=h["maps"][0]["key"]), r"maps\[1\].key"),
    "map on a stat tensor": (lambda h: h["maps"][0].update(tensor="stat/mass"), r"maps\[0\].tensor"),
    "map rows": (lambda h: h["maps"][0].update(batch=[0]), r"maps\[0\].batch"),
    "layout row -1": (_set("layouts", "rows", value=[-1, 0]), "layouts.rows"),
    "layout row too big": (_set("layouts", "rows", value=[0, 7]), "layouts.rows"),
    "layout row a string": (_set("layouts", "rows", value=["0", 0]), "layouts.rows"),
    "layout grid": (lambda h: h["layouts"]["distinct"][0].update(image_grid=[6]), r"layouts.distinct\[0\]"),
    "layout column missing": (lambda h: h["layouts"]["distinct"][0]["text"].pop("kind"), r"layouts.distinct\[0\].text"),
    "layout column length": (lambda h: h["layouts"]["distinct"][0]["text"]["token"].pop(), r"text.token"),
    "layout column type": (lambda h: h["layouts"]["distinct"][0]["text"]["position"].__setitem__(0, "0"), r"text.position"),
    "meta not an object": (_set("meta", value=[1]), "'meta'"),
    "meta grid": (_set("meta", "image_grid", value=[6, "8"]), "meta.image_grid"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_header_refused(good, tmp_path, case):
    edit, where = MALFORMED[case]
    bad = _rewrite(good, tmp_path / "bad.safetensors", edit)
    with pytest.raises(mp.ResultsFileError, match=f"malformed results header: .*{where}.*record the run again"):
        mp.AttentionResult.load(bad)


@pytest.mark.parametrize("image", ["/etc/passwd", "../secret.png", "sub/../../x.png", "..", "sub/x.png",
                                   "C:\\x.png", "..\\x.png", 7])
def test_path_in_header_refused(result, good, tmp_path, image):
    """meta.run.image is joined to the results folder by `mmdit-probe plot`: only a bare file name is allowed."""
    bad = _rewrite(good, tmp_path / "bad.safetensors", lambda h: h["meta"].setdefault("run", {}).update(image=image))
    with pytest.raises(mp.ResultsFileError, match="meta.run.image must be a bare file name"):
        mp.AttentionResult.load(bad)
    res = mp.AttentionResult(result.stats, result.maps, result.map_meta, result.layouts, {**result.meta, "run": {"image": image}})
    with pytest.raises(ValueError, match="meta.run.image"):
        res.save(tmp_path / "refused.safetensors")
    assert not (tmp_path / "refused.safetensors").exists()
    fine = _rewrite(good, tmp_path / "fine.safetensors", lambda h: h["meta"].update(run={"image": "good_image.png"}))
    assert mp.AttentionResult.load(fine).meta["run"]["image"] == "good_image.png"


# ---- schema versions ----------------------------------------------------------------------------
def test_version_1_file_loads_with_warning_and_upgrades(tmp_path):
    with pytest.warns(UserWarning, match="version-1 results file without a checksum.*Re-save it"):
        old = mp.AttentionResult.load(V1_FIXTURE)
    raw, _, _ = _parts(V1_FIXTURE)
    assert {n: tuple(s.values.shape) for n, s in old.stats.items()} == {
        "mass": (1, 4, 2, 2, 4, 2, 2), "group_mass": (1, 4, 2, 2, 4, 2, 7), "entropy": (1, 4, 2, 2, 4, 2),
        "key_mass": (1, 4, 2, 2, 4, 2, 101), "word_map": (1, 4, 1, 2, 3, 16)}
    for n, s in old.stats.items():
        assert _same(s.values, raw[f"stat/{n}"])
    assert old.words == ("a", "red", "circle") and old.layouts[1].prompt == "a red circle"
    assert old.branches == ("uncond", "cond") and list(old.maps) == [(0, 0, "attn", "text->image")]
    # the documented upgrade path: load and save again; the new file has a checksum and loads silently
    new = Path(old.save(tmp_path / "upgraded.safetensors"))
    back = _no_warnings_load(new)
    assert json.loads(_parts(new)[1]["__metadata__"]["mmdit_probe"])["version"] == mio.VERSION
    for n, s in old.stats.items():
        assert _same(s.values, back.stats[n].values)
    assert back.layouts == old.layouts and back.meta == old.meta and back.map_meta == old.map_meta


def test_version_1_file_is_still_validated(tmp_path):
    bad = tmp_path / "v1_bad.safetensors"
    tensors, st_header, _ = _parts(V1_FIXTURE)
    header = json.loads(st_header["__metadata__"]["mmdit_probe"])
    header["layouts"]["rows"] = [-1, 0]
    save_file(tensors, str(bad), metadata={"mmdit_probe": json.dumps(header)})
    with pytest.warns(UserWarning, match="without a checksum"), pytest.raises(mp.ResultsFileError, match="layouts.rows"):
        mp.AttentionResult.load(bad)


def test_version_2_without_checksum_refused(good, tmp_path):
    tensors, st_header, _ = _parts(good)
    bad = tmp_path / "stripped.safetensors"
    save_file(tensors, str(bad), metadata={"mmdit_probe": st_header["__metadata__"]["mmdit_probe"]})
    with pytest.raises(mp.ResultsFileError, match="checksum missing or wrong"):
        mp.AttentionResult.load(bad)


# ---- atomic, tidy, umask-respecting saves -------------------------------------------------------
@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt()])
def test_interrupted_save_leaves_no_temp(result, tmp_path, monkeypatch, error):
    path = tmp_path / "run.safetensors"
    result.save(path)
    before = path.read_bytes()

    def broken(fd, data):
        os.write(fd, data[:100])
        raise error

    monkeypatch.setattr(mio, "_write_all", broken)
    with pytest.raises(type(error)):
        result.save(path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["run.safetensors"]

    def broken_callable(tmp):  # the callable form sweep.py uses
        Path(tmp).write_text("partial")
        raise error

    with pytest.raises(type(error)):
        mio.atomic_write(tmp_path / "rows.csv", broken_callable)
    assert os.listdir(tmp_path) == ["run.safetensors"]


KILLED_SAVE = """
import os, signal, sys
import mmdit_probe.io as mio
def die(tmp):
    open(tmp, "wb").write(b"partial")
    os.kill(os.getpid(), signal.SIGKILL)
mio.atomic_write(sys.argv[1], die)
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="POSIX kill and advisory locks")
def test_stale_temp_removed_by_next_save(result, tmp_path):
    import fcntl

    path = tmp_path / "run.safetensors"
    proc = subprocess.run([sys.executable, "-c", KILLED_SAVE, str(path)], env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode != 0
    killed = [n for n in os.listdir(tmp_path) if n.startswith(".run.safetensors.")]
    assert len(killed) == 1 and not path.exists()  # a killed save leaves its temporary file behind
    (tmp_path / ".run.safetensors.k3x_9abc.tmp").write_bytes(b"left by the version-1 release (mkstemp name)")
    keep = [".other.safetensors.abcd1234.tmp", ".run.safetensors.x.abcd1234.tmp", "notes.txt", ".run.safetensors.tmp"]
    for n in keep:
        (tmp_path / n).write_text("not ours")
    live = tmp_path / ".run.safetensors.0123abcd.tmp"  # a save running right now in another process
    fd = os.open(live, os.O_WRONLY | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        result.save(path)
    finally:
        os.close(fd)
    assert sorted(os.listdir(tmp_path)) == sorted([*keep, live.name, "run.safetensors"])
    _no_warnings_load(path)
    result.save(path)  # no longer locked: a stale temporary file now
    assert sorted(os.listdir(tmp_path)) == sorted([*keep, "run.safetensors"])


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_saved_file_follows_umask(result, tmp_path, umask):
    old = os.umask(umask)
    try:
        result.save(tmp_path / "run.safetensors")
        mio.atomic_write(tmp_path / "rows.csv", lambda tmp: Path(tmp).write_text("a,b\n"))
    finally:
        os.umask(old)
    for name in ("run.safetensors", "rows.csv"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask


# ---------------------------------------------------------------------------------------------- fuzz
def _crafted_headers(meta: dict, header: dict) -> list[dict]:
    """Headers a hostile or broken writer could produce: wrong dims, huge declared shapes, NaN, missing keys."""
    import copy

    out = []
    for name in list(header["stats"])[:2]:
        h = copy.deepcopy(header)
        h["stats"][name]["dims"] = h["stats"][name]["dims"][:-1]
        out.append(h)
        h = copy.deepcopy(header)
        h["stats"][name]["coords"] = {d: list(range(10 ** 6)) for d in h["stats"][name]["dims"][:1]}
        out.append(h)
        h = copy.deepcopy(header)
        del h["stats"][name]["dims"]
        out.append(h)
    for key in ("stats", "maps", "layouts", "meta", "format", "version"):
        h = copy.deepcopy(header)
        h.pop(key, None)
        out.append(h)
    h = copy.deepcopy(header)
    h["meta"]["image_grid"] = [float("nan"), 2]
    out.append(h)
    h = copy.deepcopy(header)
    h["layouts"]["rows"] = [10 ** 9]
    out.append(h)
    return out


def test_fuzz_loader_never_crashes_outside_results_file_error(good, tmp_path):
    """Seeded fuzz: random truncations, byte flips and crafted headers never give anything but a clean load or
    ``ResultsFileError`` (and nothing outside the folder is opened: the loader reads only the path it is given)."""
    import random

    rng = random.Random(0)
    data = good.read_bytes()
    n = int.from_bytes(data[:8], "little")
    raw_meta = json.loads(data[8 : 8 + n])
    header = json.loads(raw_meta["__metadata__"]["mmdit_probe"])
    cases: list[bytes] = []
    for _ in range(60):  # truncations
        cases.append(data[: rng.randrange(len(data))])
    for _ in range(120):  # byte flips anywhere, header and tensor data alike
        b = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
        cases.append(bytes(b))
    for h in _crafted_headers(raw_meta, header):  # crafted headers, re-signed so the checksum passes where it can
        m = dict(raw_meta)
        m["__metadata__"] = {**raw_meta["__metadata__"], "mmdit_probe": json.dumps(h, allow_nan=True)}
        blob = json.dumps(m).encode()
        cases.append(len(blob).to_bytes(8, "little") + blob + data[8 + n :])
    opened: list[str] = []
    real_open = open

    def spy_open(file, *a, **k):
        opened.append(os.fspath(file))
        return real_open(file, *a, **k)

    loaded = refused = 0
    for i, case in enumerate(cases):
        p = tmp_path / f"case{i}.safetensors"
        p.write_bytes(case)
        try:
            with pytest.MonkeyPatch.context() as mpatch:
                mpatch.setattr("builtins.open", spy_open)
                mpatch.setattr("io.open", spy_open)
                mp.AttentionResult.load(p)
            loaded += 1
        except mp.ResultsFileError:
            refused += 1
        assert opened and all(Path(f).resolve().parent == tmp_path.resolve() for f in opened), opened
        opened.clear()
    assert refused >= len(cases) - 5 and loaded + refused == len(cases)
