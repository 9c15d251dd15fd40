"""Studies over prompt sets (mmdit_probe.study): streaming aggregation, bootstrap, prompt files, resume,
the CLI, and 2-process ``accelerate launch`` runs that must equal a single-process run exactly."""

import subprocess
import sys
import textwrap
from fractions import Fraction
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from launching import env, kill_rank1_midway, launch, read_log
import mmdit_probe as mp
from mmdit_probe.study import (PromptFileError, RunningMoments, ShardError, Study, bootstrap_mean, generate_prompts,
                               load_prompts, shipped_prompts, study)
from mmdit_probe.study.prompts import SHIPPED_PROMPTS

ROOT = Path(__file__).resolve().parent.parent
RUN = dict(num_inference_steps=2, height=32, width=40, max_sequence_length=12)
CLI_MODEL = ["--model", "tiny", "--steps", "2", "--height", "32", "--width", "40", "--max-sequence-length", "12"]
# 5 prompts (split 3 + 2 over two ranks), 2 seeds, 2 settings (CFG on / off) = 20 runs
CLI_STUDY = CLI_MODEL + ["--limit", "5", "--seeds", "0", "1", "--setting", "base", "--setting", "cfg1", "guidance=1",
                         "--n-boot", "200", "--checkpoint-every", "0", "--no-figures", "--no-progress"]
TABLES = ("summary.csv", "moments.csv", "differences.csv", "word_maps.csv")
SETTINGS = ("base", "cfg1")


@pytest.fixture(scope="module")
def pipe():
    return mp.tiny_sd3_pipeline()


@pytest.fixture(scope="module")
def prompts():
    return shipped_prompts().iloc[[0, 20, 90, 140, 200, 260]].reset_index(drop=True)  # 2 one-object, 4 two-object


@pytest.fixture(scope="module")
def small(pipe, prompts):
    """Baseline + one ablation, 2 seeds, every run kept."""
    return study(pipe, prompts, seeds=[0, 1], specs=[mp.SkipLayers([1])], keep_runs=True, n_boot=300,
                 progress=False, **RUN)


# ---- streaming moments ---------------------------------------------------------------------------
def test_running_moments_equal_batch_and_merge_bitwise():
    rng = np.random.default_rng(0)
    x = rng.normal(0.4, 0.2, (60, 300)) * np.where(rng.random((60, 300)) < 0.5, 1.0, 1e-7)
    x[rng.random(x.shape) < 0.15] = np.nan
    x[:, 0] = 0.25  # constant: variance exactly 0
    x[:, 1] = -x[:, 1] * 1e3
    whole = RunningMoments()
    for row in x:
        whole.add(None, row)
    n = (~np.isnan(x)).sum(0)
    np.testing.assert_array_equal(whole.n, n)
    np.testing.assert_allclose(whole.mean, np.nanmean(x, 0), rtol=1e-14, atol=0)
    np.testing.assert_allclose(whole.var, np.nanvar(x, 0, ddof=1), rtol=1e-10, atol=1e-30)
    assert whole.var[0] == 0.0 and whole.mean[0] == 0.25
    for j in (2, 3, 1):  # exact: the correctly rounded mean and variance of the values
        col = [Fraction(float(v)) for v in x[:, j] if not np.isnan(v)]
        m = sum(col) / len(col)
        assert whole.mean[j] == float(m)
        assert whole.var[j] == float(sum((v - m) ** 2 for v in col) / (len(col) - 1))
    # any split, merged in any order, gives the same integers (so the same floats)
    for cut in ([7, 31], [1, 2, 59], [30]):
        parts = [RunningMoments() for _ in range(len(cut) + 1)]
        for i, row in enumerate(x):
            parts[sum(i >= c for c in cut)].add(None, row)
        merged = RunningMoments()
        for p in reversed(parts):
            merged.merge(p)
        for name in ("n", "s1", "s2"):
            np.testing.assert_array_equal(getattr(merged, name), getattr(whole, name))
    with pytest.raises(ValueError, match="finite"):
        RunningMoments().add(None, np.array([np.inf]))


def test_study_moments_equal_batch_over_kept_runs(small):
    runs = small.runs
    cells = ["setting", "statistic", "step", "layer", "attention", "branch", "head", "query", "key"]
    batch = runs[runs["statistic"] != "word_map"].groupby(cells)["value"].agg(["mean", "std", "count"]).reset_index()
    got = small.moments().merge(batch, on=cells, how="outer", validate="one_to_one", indicator=True)
    assert (got["_merge"] == "both").all()
    np.testing.assert_allclose(got["mean_x"], got["mean_y"], rtol=1e-12)
    np.testing.assert_allclose(got["std_x"], got["std_y"], rtol=1e-9, atol=1e-15)
    assert (got["n"] == got["count"]).all() and (got["n"] == 6 * 2).all()  # 6 prompts x 2 seeds


def test_summary_is_mean_of_prompt_means(small):
    runs = small.runs
    mass = runs[(runs["statistic"] == "mass") & (runs["branch"] == "cond") & (runs["setting"] == "baseline")]
    per_prompt = mass.groupby(["prompt_index", "layer", "query", "key"])["value"].mean()
    expect = per_prompt.groupby(["layer", "query", "key"]).agg(["mean", "std", "count"]).reset_index()
    got = small.summary(by=["layer", "query", "key"], setting="baseline", statistic="mass", where={"branch": "cond"})
    assert list(got.columns) == ["setting", "statistic", "layer", "query", "key", "mean", "ci_low", "ci_high", "std", "n"]
    m = got.merge(expect, on=["layer", "query", "key"])
    assert len(m) == len(got) == 4 * 4
    np.testing.assert_allclose(m["mean_x"], m["mean_y"], rtol=1e-12)
    np.testing.assert_allclose(m["std_x"], m["std_y"], rtol=1e-9)
    assert (m["n"] == 6).all()
    assert ((m["ci_low"] <= m["mean_x"]) & (m["mean_x"] <= m["ci_high"])).all()
    # default: every interval column (no head), timestep next to step
    full = small.summary(statistic="mass")
    assert {"step", "timestep", "layer", "attention", "branch", "query", "key"} <= set(full.columns)
    assert "head" not in full.columns
    with pytest.raises(KeyError, match="head_intervals"):
        small.summary(by=["head"])
    # prompt metadata splits the prompts
    by_rel = small.summary(by=["n_objects"], setting="baseline", statistic="mass",
                           where={"branch": "cond", "query": "image", "key": "text"})
    assert list(by_rel["n_objects"]) == [1, 2] and list(by_rel["n"]) == [2, 4]


def test_difference_is_paired_by_prompt_and_seed(small):
    runs = small.runs
    cond = runs[(runs["statistic"] == "mass") & (runs["branch"] == "cond") & (runs["layer"] == 2)]
    wide = cond.pivot_table(index=["prompt_index", "seed", "head", "step", "query", "key"], columns="setting",
                            values="value").dropna()
    d = (wide["skip block 1"] - wide["baseline"]).groupby(["prompt_index", "query", "key"]).mean()
    expect = d.groupby(["query", "key"]).mean()
    got = small.difference(by=["query", "key"], statistic="mass", where={"branch": "cond", "layer": 2})
    assert set(got[["a", "b"]].itertuples(index=False, name=None)) == {("baseline", "skip block 1")}
    np.testing.assert_allclose(got.set_index(["query", "key"])["mean"].loc[expect.index], expect.to_numpy(), rtol=1e-9)
    np.testing.assert_allclose(got["mean"], got["mean_b"] - got["mean_a"], rtol=1e-9, atol=1e-15)
    # the skipped layer has no cells in the ablated setting: no rows
    assert small.difference(by=["layer"], statistic="mass")["layer"].tolist() == [0, 2, 3]


def test_word_maps_aligned_by_word(small, prompts):
    words = small.words
    present = {w for p in prompts["prompt"] for w in p.split()}
    assert set(words) == present
    wm = small.word_maps(words=["circle"])
    n_circle = sum("circle" in p.split() for p in prompts["prompt"])
    assert set(wm["n"]) == {n_circle} and set(wm["branch"]) == {"cond"}
    h, w = small.image_grid()
    assert len(wm) == h * w
    runs = small.runs
    circle = runs[(runs["word"] == "circle") & (runs["setting"] == "baseline")]
    expect = circle.groupby(["prompt_index", "y", "x"])["value"].mean().groupby(["y", "x"]).mean()
    got = small.word_map("circle")
    yy, xx = (expect.index.get_level_values(i).to_numpy(int) for i in (0, 1))
    np.testing.assert_allclose(got["mean"][yy, xx], expect.to_numpy(), rtol=1e-12)
    assert got["mean"].shape == (h, w) and got["n"] == n_circle


def test_save_load_and_figures(small, tmp_path):
    import matplotlib.pyplot as plt

    path = small.save(tmp_path / "s.npz")
    back = Study.load(path)
    pd.testing.assert_frame_equal(back.summary(), small.summary())
    pd.testing.assert_frame_equal(back.prompts, small.prompts, check_dtype=False)
    for fig in (small.plot_quadrants("layer"), small.plot_quadrants("step", setting=small.settings),
                small.plot_groups(), small.plot_difference(), small.plot_word_maps(["circle", "red"])):
        assert fig.axes
        plt.close(fig)


# ---- bootstrap -----------------------------------------------------------------------------------
@pytest.mark.parametrize("level", [0.8, 0.95])
def test_bootstrap_interval_coverage(level):
    """Intervals of 200 seeded samples (40 draws from N(1, 2²)) cover the true mean at about ``level``."""
    rng = np.random.default_rng(12345)
    reps, hits = 200, 0
    for r in range(reps):
        x = rng.normal(1.0, 2.0, 40)
        _, low, high, n = bootstrap_mean(x, level=level, n_boot=1000, seed=r)
        hits += bool(low[0] <= 1.0 <= high[0])
    tol = 3.0 * np.sqrt(level * (1 - level) / reps)  # binomial: 3 standard errors
    assert abs(hits / reps - level) <= tol, (hits, reps, level)


def test_bootstrap_details():
    v = np.array([[1.0, np.nan, 5.0], [2.0, np.nan, np.nan], [3.0, 4.0, np.nan], [4.0, np.nan, np.nan]])
    mean, low, high, n = bootstrap_mean(v, n_boot=500, seed=3)
    np.testing.assert_array_equal(n, [4, 1, 1])
    np.testing.assert_allclose(mean, [2.5, 4.0, 5.0])
    assert 1.0 <= low[0] < 2.5 < high[0] <= 4.0
    assert np.isnan(low[1:]).all() and np.isnan(high[1:]).all()  # one prompt: no interval
    again = bootstrap_mean(v, n_boot=500, seed=3)
    np.testing.assert_array_equal(again[1], low)
    assert not np.array_equal(bootstrap_mean(v, n_boot=500, seed=4)[1], low)
    with pytest.raises(ValueError):
        bootstrap_mean(v, level=1.5)


# ---- prompts -------------------------------------------------------------------------------------
def test_shipped_prompts_are_generated_and_licensed():
    df = shipped_prompts()
    pd.testing.assert_frame_equal(df, generate_prompts())
    assert 200 <= len(df) <= 500 and df["prompt"].is_unique
    assert list(df.columns) == ["prompt", "n_objects", "objects", "colours", "relation", "shapes_world"]
    from mmdit_probe.tokenizers import DEFAULT_VOCAB

    assert {w for p in df["prompt"] for w in p.split()} <= set(DEFAULT_VOCAB)
    assert (df["shapes_world"] == "true").sum() >= 10
    assert "CC0" in (SHIPPED_PROMPTS.parent / "LICENSE").read_text()
    assert (SHIPPED_PROMPTS.parent / "README.md").exists()


def test_prompt_files_parsed(tmp_path):
    csv = tmp_path / "p.csv"
    csv.write_text('id,prompt,topic\n1,"a red circle, big",shapes\n\n2,a cat,animals\n', encoding="utf-8")
    df = load_prompts(csv)
    assert list(df.columns) == ["prompt", "id", "topic"]
    assert df["prompt"].tolist() == ["a red circle, big", "a cat"] and df["topic"].tolist() == ["shapes", "animals"]
    jl = tmp_path / "p.jsonl"
    jl.write_text('{"prompt": "a red circle", "n": 1}\n\n{"prompt": "a dog", "tag": "x", "n": null}\n')
    df = load_prompts(jl)
    assert df["prompt"].tolist() == ["a red circle", "a dog"] and list(df.columns) == ["prompt", "n", "tag"]
    assert load_prompts(jl, limit=1)["prompt"].tolist() == ["a red circle"]


@pytest.mark.parametrize("name,text,line,what", [
    ("a.csv", "text,topic\na cat,x\n", 1, "no 'prompt' column"),
    ("b.csv", "prompt,topic\na cat,x\na dog\n", 3, "has 1 fields, the header has 2"),
    ("c.csv", "prompt,topic\na cat,x\n ,y\n", 3, "empty prompt"),
    ("d.csv", 'prompt\n"a cat\n', 2, "bad CSV"),
    ("e.jsonl", '{"prompt": "a"}\n{"prompt": "b",}\n', 2, "not valid JSON"),
    ("f.jsonl", '{"prompt": "a"}\n\n["b"]\n', 3, "expected a JSON object"),
    ("g.jsonl", '{"text": "a"}\n', 1, "no 'prompt' field"),
    ("h.jsonl", '{"prompt": 3}\n', 1, "must be text"),
    ("i.jsonl", '{"prompt": "a", "meta": {"x": 1}}\n', 1, "must be text, a number"),
    ("j.csv", "", None, "is empty"),
    ("k.txt", "a cat\n", None, "unknown prompt file type"),
])
def test_bad_prompt_files_refused_naming_file_and_line(tmp_path, name, text, line, what):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(PromptFileError) as err:
        load_prompts(path)
    msg = str(err.value)
    assert str(path) in msg and what in msg, msg
    assert err.value.line == line
    if line is not None:
        assert f"line {line}" in msg


def test_bad_encoding_names_line(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_bytes(b"prompt\na cat\na \xff dog\n")
    with pytest.raises(PromptFileError, match=r"bad\.csv, line 3: is not UTF-8"):
        load_prompts(path)


# ---- resume, failures, plans (in process) --------------------------------------------------------
def test_failed_runs_are_recorded_then_retried_on_resume(pipe, prompts, tmp_path, monkeypatch):
    import importlib

    runner = importlib.import_module("mmdit_probe.study.runner")
    real = runner.run_unit
    calls = []

    def flaky(p, setting, prompt, seed, *a, **k):
        calls.append((prompt, seed))
        if prompt == prompts["prompt"][1] and seed == 1:
            raise RuntimeError("boom")
        return real(p, setting, prompt, seed, *a, **k)

    kw = dict(seeds=[0, 1], statistics=["mass"], n_boot=100, progress=False, checkpoint_every=0, **RUN)
    monkeypatch.setattr(runner, "run_unit", flaky)
    first = study(pipe, prompts[:3], out=tmp_path, **kw)
    assert first.report["failed"] == 1 and first.report["done"] == 5
    assert "boom" in first.report_text()
    monkeypatch.setattr(runner, "run_unit", real)
    calls.clear()
    monkeypatch.setattr(runner, "run_unit", lambda *a, **k: calls.append(a[2:4]) or real(*a, **k))
    second = study(pipe, prompts[:3], out=tmp_path, **kw)
    assert calls == [(prompts["prompt"][1], 1)]  # only the failed run again
    assert second.report == {**second.report, "ran": 1, "skipped": 5, "failed": 0, "done": 6}
    clean = study(pipe, prompts[:3], **kw)
    pd.testing.assert_frame_equal(second.summary(), clean.summary())
    pd.testing.assert_frame_equal(second.moments(), clean.moments())
    pd.testing.assert_frame_equal(Study.load(tmp_path).summary(), clean.summary())
    # another study in the same folder is refused, so is a fresh start over existing shards
    with pytest.raises(ShardError, match="seeds"):
        study(pipe, prompts[:3], out=tmp_path, **{**kw, "seeds": [0]})
    with pytest.raises(FileExistsError, match="resume"):
        study(pipe, prompts[:3], out=tmp_path, resume=False, **kw)


def test_settings_and_errors(pipe, prompts):
    from mmdit_probe.study import Setting, without_t5

    res = study(pipe, prompts[:2], statistics=["group_mass"], n_boot=50, progress=False,
                settings={"t5": {}, "no t5": Setting(pipe=without_t5(pipe)), "cfg 1": {"guidance_scale": 1.0}}, **RUN)
    assert res.settings == ["t5", "no t5", "cfg 1"]
    d = res.difference("t5", "no t5", by=["query", "key"], where={"branch": "cond"})
    t5_real = d[(d["query"] == "image") & (d["key"] == "t5_real")].iloc[0]
    assert t5_real["mean_b"] == 0.0 and t5_real["mean_a"] > 0  # no T5: no mass on T5 prompt tokens
    assert set(res.difference("t5", "cfg 1")["branch"]) == {"cond"}  # only the cells both have
    with pytest.raises(ValueError, match="not both"):
        study(pipe, "a cat", specs=[mp.SkipLayers([0])], settings={"a": {}}, **RUN)
    with pytest.raises(ValueError, match="statistic"):
        study(pipe, "a cat", statistics=["nope"], **RUN)
    with pytest.raises(ValueError, match="generator"):
        study(pipe, "a cat", generator=None, **RUN)


# ---- CLI (in process until `study` is registered in mmdit_probe.cli) -----------------------------
def test_cli_in_process(tmp_path, capsys):
    from mmdit_probe.cli import study as cli_study

    out = tmp_path / "out"
    code = cli_study.main(CLI_MODEL + ["--limit", "3", "--seeds", "0", "--specs", "skip-layers", "--n-boot", "50",
                                       "--out", str(out), "--no-progress"])
    assert code == 0, capsys.readouterr().err
    for name in TABLES + ("study.npz", "quadrants_by_layer.png", "difference_1.png", "key_groups.png", "word_maps.png"):
        assert (out / name).exists(), name
    summary = pd.read_csv(out / "summary.csv")
    assert {"mean", "ci_low", "ci_high", "n"} <= set(summary.columns)
    assert "15 run now" in capsys.readouterr().out  # 3 prompts x 1 seed x (baseline + skip each of 4 layers)
    # an existing study is not overwritten without --resume; --resume skips everything
    assert cli_study.main(CLI_MODEL + ["--limit", "3", "--seeds", "0", "--specs", "skip-layers", "--out", str(out),
                                       "--no-progress"]) == 2
    assert "--resume" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\n{"prompt": ""}\n')
    assert cli_study.main(CLI_MODEL + ["--prompts", str(bad), "--out", str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err
    assert f"{bad}, line 2: empty prompt" in err and "Traceback" not in err


def test_cli_registered_if_present():
    """Once registered (mmdit_probe.cli.SUBCOMMANDS), `python -m mmdit_probe study --help` reaches this command."""
    from mmdit_probe.cli import SUBCOMMANDS

    if "study" not in SUBCOMMANDS:
        pytest.skip("`study` is not registered in mmdit_probe.cli yet")
    out = subprocess.run([sys.executable, "-m", "mmdit_probe", "study", "--help"], capture_output=True, text=True,
                         cwd=ROOT, env=env(), timeout=120)
    assert out.returncode == 0 and "--prompts" in out.stdout


# ---- several processes (accelerate launch, CPU / gloo) -------------------------------------------
SCRIPT = textwrap.dedent('''
    """Test driver: the study CLI, optionally logging every run and every shard write, slowed down."""
    import importlib, json, os, sys, time

    import torch

    torch.set_num_threads(1)
    log_dir, slow = os.environ.get("STUDY_LOG"), float(os.environ.get("STUDY_SLOW", "0"))
    if log_dir:
        runner = importlib.import_module("mmdit_probe.study.runner")
        rank = os.environ.get("RANK", "0")

        def log(kind, value):
            with open(os.path.join(log_dir, f"rank{rank}.log"), "a") as fh:
                fh.write(kind + "\\t" + json.dumps(value) + "\\n")

        log("pid", os.getpid())
        run_unit, write_shard = runner.run_unit, runner.write_shard

        def logged_run(pipe, setting, prompt, seed, *a, **k):
            out = run_unit(pipe, setting, prompt, seed, *a, **k)
            time.sleep(slow)
            log("ran", [prompt, seed, setting.name])
            return out

        def logged_write(path, state, *a, **k):
            write_shard(path, state, *a, **k)
            log("persisted", sorted(state.done))

        runner.run_unit, runner.write_shard = logged_run, logged_write

    from mmdit_probe.cli.study import main

    sys.exit(main(sys.argv[1:]))
''')


@pytest.fixture(scope="module")
def script(tmp_path_factory):
    path = tmp_path_factory.mktemp("driver") / "study_driver.py"
    path.write_text(SCRIPT)
    return path


@pytest.fixture(scope="module")
def reference(script, tmp_path_factory):
    """The study on one process (plain python, not launched)."""
    out = tmp_path_factory.mktemp("one") / "out"
    r = subprocess.run([sys.executable, str(script), *CLI_STUDY, "--out", str(out)], capture_output=True, text=True,
                       env=env(), cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert [p.name for p in (out / "shards").glob("*.npz")] == ["shard-000-of-001.npz"]
    return out


def _same_study(a: Path, b: Path) -> None:
    for name in TABLES:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    sa, sb = Study.load(a).state, Study.load(b).state
    assert sorted(sa.blocks) == sorted(sb.blocks) and sa.done == sb.done
    aa, ab = sa.to_arrays(), sb.to_arrays()
    assert sorted(aa) == sorted(ab)
    for k in aa:
        if k != "header":
            np.testing.assert_array_equal(aa[k], ab[k], err_msg=k)


def test_accelerate_two_processes_equal_one(script, reference, tmp_path):
    out = tmp_path / "out"
    r = subprocess.run([*launch(2), str(script), *CLI_STUDY, "--out", str(out)], capture_output=True, text=True,
                       env=env(), cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    shards = sorted(p.name for p in (out / "shards").glob("*.npz"))
    assert shards == ["shard-000-of-002.npz", "shard-001-of-002.npz"]
    assert "20 run now, 0 skipped (finished before), 0 failed" in r.stdout + r.stderr
    _same_study(reference, out)


def test_kill_one_rank_then_resume(script, reference, tmp_path):
    out, logs1, logs2 = tmp_path / "out", tmp_path / "log1", tmp_path / "log2"
    logs1.mkdir()
    logs2.mkdir()
    prompts = shipped_prompts().head(5)["prompt"].tolist()
    kill_rank1_midway([*launch(2), str(script), *CLI_STUDY, "--out", str(out)],
                      env(STUDY_LOG=str(logs1), STUDY_SLOW="0.4"), logs1)
    assert not (out / "study.npz").exists()

    def unit(p, seed, i):
        return (prompts[p], seed, SETTINGS[i])

    # what the shards on disk hold is what counts as finished (each rank's last complete atomic write)
    from mmdit_probe.study.shards import read_shard, shard_path

    held = [read_shard(shard_path(out, rank, 2)).done for rank in (0, 1)]
    finished = {unit(*u) for done in held for u in done}
    assert 3 <= len(held[1]) < 8, held[1]  # rank 1 (prompts 3 and 4: 8 runs) died mid-way
    for rank in (0, 1):  # every write the driver saw complete is in the shard
        writes = [v for k, v in read_log(logs1 / f"rank{rank}.log") if k == "persisted"]
        assert not writes or {tuple(u) for u in writes[-1]} <= held[rank]

    r = subprocess.run([*launch(2), str(script), *CLI_STUDY, "--out", str(out), "--resume"], capture_output=True,
                       text=True, env=env(STUDY_LOG=str(logs2)), cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    ran_again = [tuple(v) for rank in (0, 1) for k, v in read_log(logs2 / f"rank{rank}.log") if k == "ran"]
    assert len(ran_again) == len(set(ran_again))
    assert not set(ran_again) & finished  # nothing finished before is redone
    assert set(ran_again) | finished == {(p, s, name) for p in prompts for s in (0, 1) for name in SETTINGS}
    assert f"{len(ran_again)} run now, {len(finished)} skipped (finished before), 0 failed" in r.stdout + r.stderr
    _same_study(reference, out)


def test_accelerate_module_entry_when_registered(reference, tmp_path):
    """``accelerate launch -m mmdit_probe study`` (needs the registration in mmdit_probe.cli)."""
    from mmdit_probe.cli import SUBCOMMANDS

    if "study" not in SUBCOMMANDS:
        pytest.skip("`study` is not registered in mmdit_probe.cli yet")
    out = tmp_path / "out"
    r = subprocess.run([*launch(2), "-m", "mmdit_probe", "study", *CLI_STUDY, "--out", str(out)], capture_output=True,
                       text=True, env=env(), cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    _same_study(reference, out)
