"""compare(): T5 present vs omitted, CFG branches, base vs LoRA; alignment errors; the difference map."""

from __future__ import annotations

import re

import pytest
import torch
from peft import LoraConfig
from reference import capture_attention_inputs, reference_probs

import mmdit_probe as mp
from mmdit_probe.compare import branch_view, compare, lora_parameter_counts, plot_difference
from mmdit_probe.models import tiny_sd3_pipeline

PROMPT = "a red circle left of a blue square"
CALL = dict(num_inference_steps=2, height=32, width=32, max_sequence_length=16, guidance_scale=5.0, output_type="pt")
TARGETS = ["to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj"]


def _record(pipe, **kw):
    with mp.AttentionRecorder(pipe, **kw) as rec:
        out = pipe(PROMPT, generator=torch.manual_seed(0), **CALL)
    return rec.result, out.images


@pytest.fixture(scope="module")
def base_run():
    pipe = tiny_sd3_pipeline("sd35")
    return pipe, _record(pipe, groups=True)[0]


def test_t5_present_vs_omitted(base_run):
    pipe, with_t5 = base_run
    no_t5 = _record(tiny_sd3_pipeline("sd35", with_t5=False), groups=True)[0]
    c = compare(with_t5, no_t5, "group_mass", labels=("t5", "no_t5"))
    t5_real = c.b.sel(key_group="t5_real", attention="attn")
    assert torch.all(t5_real.values == 0)  # no T5 tokens: nothing attends to them
    cond = with_t5.branches.index("cond")  # the uncond prompt "" has no real T5 tokens
    assert torch.all(c.a.sel(key_group="t5_real", attention="attn", batch=cond).values > 0)
    d = c.difference.sel(key_group="t5_real", attention="attn")
    assert torch.equal(d.values, -c.a.sel(key_group="t5_real", attention="attn").values)
    m = compare(with_t5, no_t5)  # quadrant masses: same dims (same max_sequence_length)
    assert torch.equal(m.difference.values.nan_to_num(), (no_t5.mass.values - with_t5.mass.values).nan_to_num())


def test_cfg_branches(base_run):
    _, res = base_run
    c = compare(branch_view(res, "uncond"), branch_view(res, "cond"), labels=("uncond", "cond"))
    u, k = res.branches.index("uncond"), res.branches.index("cond")
    expected = res.mass.values[:, :, :, [k]] - res.mass.values[:, :, :, [u]]
    assert torch.equal(c.difference.values.nan_to_num(), expected.nan_to_num())
    assert c.difference.values.nan_to_num().abs().max() > 0
    ratio = res.mass.values[:, :, :, [k]] / res.mass.values[:, :, :, [u]]
    assert torch.allclose(c.ratio.values.nan_to_num(), ratio.nan_to_num())
    df = c.to_dataframe()
    assert {"a", "b", "difference", "ratio", "branch_uncond", "branch_cond"} <= set(df.columns)
    assert set(df["branch_uncond"]) == {"uncond"} and set(df["branch_cond"]) == {"cond"}
    assert torch.allclose(torch.tensor((df["b"] - df["a"]).to_numpy()), torch.tensor(df["difference"].to_numpy()))
    with pytest.raises(KeyError, match="branches"):
        branch_view(res, "nope")


def test_misaligned_results_raise_with_a_hint(base_run):
    _, res = base_run
    with pytest.raises(ValueError, match=r"dim 'step'.*\.sel\(step="):
        compare(res, res.sel(step=[0]))
    with pytest.raises(ValueError, match="dims differ"):
        compare(res, res.sel(attention="attn"))
    with pytest.raises(ValueError, match="branch_view"):
        compare(res.sel(batch=[0]), res.sel(batch=[1]))


def test_lora_counts_recording_and_comparison(base_run):
    pipe, base = base_run
    base_images = pipe(PROMPT, generator=torch.manual_seed(0), **CALL).images
    tr = tiny_sd3_pipeline("sd35").transformer
    total_before = sum(p.numel() for p in tr.parameters())
    r = 4
    expected_lora = sum(r * (m.in_features + m.out_features) for n, m in tr.named_modules()
                        if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in TARGETS)
    tr.add_adapter(LoraConfig(r=r, lora_alpha=r, target_modules=TARGETS, init_lora_weights=False))
    counts = lora_parameter_counts(tr)
    assert counts.lora == counts.trainable == expected_lora
    assert counts.total == total_before + expected_lora and counts.frozen == total_before
    m = re.fullmatch(r"trainable params: ([\d,]+) \|\| all params: ([\d,]+) \|\| trainable%: ([\d.]+)", str(counts))
    assert m and int(m[1].replace(",", "")) == expected_lora
    assert float(m[3]) == pytest.approx(100 * expected_lora / (total_before + expected_lora), abs=1e-4)

    lora_pipe = tiny_sd3_pipeline("sd35", transformer=tr)
    plain = lora_pipe(PROMPT, generator=torch.manual_seed(0), **CALL).images
    with capture_attention_inputs(tr) as calls:
        res, recorded = _record(lora_pipe)
    assert torch.equal(plain, recorded)  # recording changes nothing, bitwise
    assert not torch.equal(plain, base_images)  # the adapter does change the model
    for call, layer, name, hs, ehs in calls[::5]:  # explicit fp64 softmax on the LoRA'd projections
        p = reference_probs(getattr(tr.transformer_blocks[layer], name), hs, ehs)
        n_img = hs.shape[1]
        to_text = p[..., n_img:].sum(-1)
        got = res.mass.sel(step=call, layer=layer, attention=name)
        if ehs is not None:
            assert torch.allclose(got.sel(query="image", key="text").values.double(), to_text[..., :n_img].mean(-1), atol=1e-5)
            assert torch.allclose(got.sel(query="text", key="text").values.double(), to_text[..., n_img:].mean(-1), atol=1e-5)
    c = compare(base, res, labels=("base", "lora"))
    assert c.difference.values.nan_to_num().abs().max() > 1e-3


def test_plot_difference_diverging_centred(base_run):
    import matplotlib.pyplot as plt

    _, res = base_run
    c = compare(branch_view(res, "uncond"), branch_view(res, "cond"), labels=("uncond", "cond"))
    fig = plot_difference(c, attention="attn")
    try:
        images = [ax.get_images()[0] for ax in fig.get_axes() if ax.get_images()]
        assert len(images) == 4
        d = c.difference.sel(attention="attn").mean("batch", "head").values
        lim = float(d[torch.isfinite(d)].abs().max())
        for im in images:
            assert im.norm.vcenter == 0 and im.norm.vmin == pytest.approx(-lim) and im.norm.vmax == pytest.approx(lim)
            assert im.get_array().shape == (res.mass.shape["layer"], res.mass.shape["step"])
        titles = {ax.get_title() for ax in fig.get_axes()}
        assert {"image → image", "image → text", "text → image", "text → text"} <= titles
    finally:
        plt.close("all")
