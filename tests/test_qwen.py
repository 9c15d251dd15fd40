"""Qwen-Image: recording is exact and does not perturb; layouts follow the tokenizer; ablations apply.

Reference for exactness: the q/k (and padding mask) the attention kernel actually received in a *vanilla*
run (``F.scaled_dot_product_attention`` wrapped by the test while the transformer runs, so the text
encoder's own attention is not captured), softmax in float64 with masked keys at ``-inf``. Reference for
skipped blocks: diffusers' own ``LayerSkipConfig`` / ``apply_layer_skip``, whose block hook returns
``(hidden_states, encoder_hidden_states)`` whatever the block's order (design.md §11), put back in the
block's own ``(text, image)`` order with diffusers' registry metadata for the block. Reference for
knock-outs: diffusers' own processor with its kernel replaced by an fp64 masked softmax.
"""

from __future__ import annotations

import contextlib
from unittest import mock

import diffusers.models.transformers.transformer_qwenimage as qwen_module
import pytest
import torch
from diffusers.hooks import HookRegistry, LayerSkipConfig, apply_layer_skip
from diffusers.hooks._helpers import TransformerBlockRegistry
from diffusers.models.attention_processor import AttnProcessor2_0
from diffusers.models.transformers.transformer_qwenimage import QwenDoubleStreamAttnProcessor2_0

import mmdit_probe as mp
from reference import kernel_inputs as reference_kernel_inputs
from mmdit_probe.families import resolve_family
from mmdit_probe.layout import KEY_GROUPS, WordTruncatedError
from mmdit_probe.tiny_qwen import QWEN_TEMPLATE, tiny_qwen_image_pipeline

PROMPT = "a red circle left of a blue square"
SHORT = "a cat"  # 2 prompt tokens against PROMPT's 8: a padded batch
KW = dict(height=32, width=40, num_inference_steps=2, true_cfg_scale=1.0, output_type="latent")
N_LAYERS = 3


@pytest.fixture(scope="module")
def pipe():
    return tiny_qwen_image_pipeline(seed=1, num_layers=N_LAYERS)


def run(pipe, prompt=PROMPT, **kw):
    return pipe(prompt, generator=torch.manual_seed(0), **{**KW, **kw}).images


def kernel_inputs(transformer):
    """Every ``(q, k, attn_mask)`` the attention kernel receives inside the transformer's forward."""
    return reference_kernel_inputs(transformer, masks=True)


def keep_of(q, k, mask) -> torch.Tensor:
    """``[B, S_k]`` bool: the keys the kernel's key mask keeps (all without a mask)."""
    return torch.ones(q.shape[0], k.shape[2], dtype=torch.bool) if mask is None else mask[:, 0, 0]


def probabilities(q, k, keep) -> torch.Tensor:
    """fp64 softmax ``[B, H, S, S]`` over the attended keys."""
    logits = q.double() @ k.double().transpose(-1, -2) / q.shape[-1] ** 0.5
    return torch.softmax(logits.masked_fill(~keep[:, None, None, :], float("-inf")), -1)


def check_row(res, step, layer, b, P, lay):
    """Every statistic of result row ``b`` at (step, layer) against the fp64 matrix ``P [H, S, S]`` (text first)."""
    n_text = lay.n_text
    parts = {"image": slice(n_text, None), "text": slice(0, n_text)}
    at = (step, layer, 0, b)
    mass, gm = res.mass.values[at].double(), res.stat("group_mass").values[at].double()
    ent, km = res.stat("entropy").values[at].double(), res.stat("key_mass").values[at].double()
    for qi, qs in enumerate(("image", "text")):
        to_text = P[:, parts[qs], :n_text].sum(-1)
        torch.testing.assert_close(mass[:, qi, 1], to_text.mean(-1), atol=2e-6, rtol=0)
        torch.testing.assert_close(mass[:, qi, 0], 1 - to_text.mean(-1), atol=2e-6, rtol=0)
        for gi, group in enumerate(KEY_GROUPS):
            ref = P[:, parts[qs]][..., lay.group_positions(group)].sum(-1).mean(-1)
            torch.testing.assert_close(gm[:, qi, gi], ref, atol=2e-6, rtol=0)
        h = -torch.special.xlogy(P[:, parts[qs]], P[:, parts[qs]]).sum(-1).mean(-1)
        torch.testing.assert_close(ent[:, qi], h, atol=2e-5, rtol=0)
        torch.testing.assert_close(km[:, qi], P[:, parts[qs]].sum(-2), atol=2e-5, rtol=0)
    wm = res.stat("word_map").values[at].double()  # [H, word, image_token]
    for wi, word in enumerate(res.words):
        if word in lay.words:
            ref = P[:, n_text:, lay.word_positions(word)].sum(-1)
            torch.testing.assert_close(wm[:, wi], ref, atol=2e-6, rtol=0)


STATS = dict(groups=True, words=True, word_heads="all", entropy=True, key_mass=True)


def test_recording_is_exact_and_bitwise(pipe):
    with kernel_inputs(pipe.transformer) as seen:
        base = run(pipe)
    with mp.AttentionRecorder(pipe, **STATS) as rec:
        out = run(pipe)
    assert torch.equal(out, base)
    res = rec.result
    assert len(seen) == 2 * N_LAYERS and res.mass.shape["layer"] == N_LAYERS
    assert res.mass.aux["block_kind"][1] == ("joint",) * N_LAYERS and res.branches == ("cond",)
    lay = res.layouts[0]
    assert lay.order == ("text", "image") == mp.joint_order(pipe) and lay.n_text == 8 + 5 and lay.n_image == 80
    for i, (q, k, mask) in enumerate(seen):
        keep = keep_of(q, k, mask)
        assert keep.all() and q.shape[2] == lay.n_tokens  # one prompt: no padding, no mask
        step, layer = divmod(i, N_LAYERS)
        check_row(res, step, layer, 0, probabilities(q, k, keep)[0], lay)


def test_padded_batch_statistics_are_over_unmasked_keys(pipe):
    prompts = [SHORT, PROMPT]
    with kernel_inputs(pipe.transformer) as seen:
        base = run(pipe, prompts)
    with mp.AttentionRecorder(pipe, **STATS) as rec:
        out = run(pipe, prompts)
    assert torch.equal(out, base)
    res = rec.result
    short, long = res.layouts
    assert [lay.prompt for lay in res.layouts] == prompts and short.n_text == long.n_text == 13
    assert [t.kind for t in short.text] == ["real"] * 2 + ["special"] * 5 + ["padding"] * 6
    for i, (q, k, mask) in enumerate(seen):
        keep = keep_of(q, k, mask)
        assert keep[0, :13].tolist() == [True] * 7 + [False] * 6 and keep[1].all()  # the pipeline's mask
        P = probabilities(q, k, keep)
        step, layer = divmod(i, N_LAYERS)
        for b, lay in enumerate(res.layouts):
            check_row(res, step, layer, b, P[b], lay)
    padding = KEY_GROUPS.index("t5_padding")
    assert (res.stat("group_mass").values[:, :, 0, 0, :, :, padding] == 0).all()  # masked keys get nothing


def test_true_cfg_rows_layouts_and_steps(pipe):
    with mp.AttentionRecorder(pipe, words=True) as rec:
        run(pipe, negative_prompt="a green triangle", true_cfg_scale=2.0, num_inference_steps=3)
    res = rec.result
    assert res.branches == ("cond", "uncond")
    assert [lay.prompt for lay in res.layouts] == [PROMPT, "a green triangle"]
    assert [lay.n_text for lay in res.layouts] == [13, 3 + 5]  # each call has its own text length
    assert res.mass.shape["step"] == 3 and torch.isfinite(res.mass.values).all()
    assert res.timesteps == pytest.approx(pipe.scheduler.timesteps[:3].tolist(), rel=1e-5)


def test_layout_follows_the_tokenizer_ids(pipe):
    tok, drop = pipe.tokenizer, pipe.prompt_template_encode_start_idx
    assert pipe.prompt_template_encode == QWEN_TEMPLATE
    prefix = QWEN_TEMPLATE.split("{}")[0]
    assert len(tok(prefix).input_ids) == drop == 34  # the tiny tokenizer drops exactly what the real one does
    prompt = "A zebra-like café, left of 3 cats"
    lay = mp.prompt_layout(pipe, prompt, height=32, width=40)
    ids = tok(QWEN_TEMPLATE.format(prompt)).input_ids[drop:]
    assert [t.token_id for t in lay.text] == ids and lay.image_grid == (8, 10)
    n_prompt = len(tok(prompt).input_ids)
    assert [t.kind for t in lay.text] == ["real"] * n_prompt + ["special"] * 5
    for word in ("zebra-like", "café", "cats", "3"):
        pos = [p - lay.text_slice.start for p in lay.word_positions(word)]
        assert tok.decode([ids[p] for p in pos]).strip().lower() == word
    unlabelled = [t.token_id for t in lay.tokens(kind="real") if t.word is None]
    assert unlabelled and all(not any(c.isalnum() for c in tok.decode([i])) for i in unlabelled)  # "," and " "
    with mp.AttentionRecorder(pipe) as rec:
        run(pipe, prompt, num_inference_steps=1)
    assert rec.result.layouts[0] == lay
    cut = mp.prompt_layout(pipe, prompt, height=32, width=40, max_sequence_length=4)
    assert cut.text == lay.text[:4]
    with pytest.raises(WordTruncatedError):
        cut.word_positions("cats")


def _reordered_skip(block):
    """diffusers' block-skip output (hidden, encoder) put back in the order its registry says the block returns."""
    meta = TransformerBlockRegistry.get(type(block))

    def hook(module, args, kwargs, output):
        out = [None, None]
        out[meta.return_hidden_states_index], out[meta.return_encoder_hidden_states_index] = output
        return tuple(out)
    return hook


@pytest.mark.parametrize("layer", [1, N_LAYERS - 1])
def test_skip_layers_equals_diffusers_layer_skip(pipe, layer):
    block = pipe.transformer.transformer_blocks[layer]
    apply_layer_skip(pipe.transformer, LayerSkipConfig(indices=[layer], fqn="transformer_blocks"))
    h = block.register_forward_hook(_reordered_skip(block), with_kwargs=True)
    try:
        reference = run(pipe)
    finally:
        h.remove()
        HookRegistry.check_if_exists_or_initialize(pipe.transformer).remove_hook("layer_skip_hook", recurse=True)
    with mp.intervene(pipe, mp.SkipLayers([layer])):
        out = run(pipe)
    assert torch.equal(out, reference)
    assert not torch.equal(out, run(pipe))


def test_skip_attention_equals_zero_attention_output(pipe):
    attn = pipe.transformer.transformer_blocks[1].attn
    h = attn.register_forward_hook(lambda m, a, out: tuple(torch.zeros_like(o) for o in out))
    try:
        reference = run(pipe)
    finally:
        h.remove()
    with mp.intervene(pipe, mp.SkipLayers([1], mode="attention")):
        assert torch.equal(run(pipe), reference)


def test_zero_text_word_equals_zeroed_block_input(pipe):
    lay = mp.prompt_layout(pipe, PROMPT, height=32, width=40)
    pos = [p - lay.text_slice.start for p in lay.word_positions("red")]

    def zero(module, args, kwargs):
        ehs = kwargs["encoder_hidden_states"].clone()
        ehs[:, pos] = 0
        return args, {**kwargs, "encoder_hidden_states": ehs}

    h = pipe.transformer.transformer_blocks[2].register_forward_pre_hook(zero, with_kwargs=True)
    try:
        reference = run(pipe)
    finally:
        h.remove()
    with mp.intervene(pipe, mp.ZeroText(layers=[2], words=["red"])):
        assert torch.equal(run(pipe), reference)


@contextlib.contextmanager
def reference_kernel(transformer, layer, forbid):
    """diffusers' own processors run; at ``layer`` their ``dispatch_attention_fn`` becomes an fp64 softmax with the
    query/key pairs ``forbid(S) [S, S]`` (and the padding mask) removed, on every head."""
    active = {"on": False}
    real = qwen_module.dispatch_attention_fn

    def kernel(query, key, value, attn_mask=None, **kwargs):
        if not active["on"]:
            return real(query, key, value, attn_mask=attn_mask, **kwargs)
        q, k, v = (t.transpose(1, 2).double() for t in (query, key, value))
        logits = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
        banned = forbid(q.shape[2]) if attn_mask is None else forbid(q.shape[2]) | ~attn_mask
        p = torch.softmax(logits.masked_fill(banned, float("-inf")), -1)
        return (p @ v).transpose(1, 2).to(query.dtype)

    attn = transformer.transformer_blocks[layer].attn
    hooks = [attn.register_forward_pre_hook(lambda *a: active.__setitem__("on", True)),
             attn.register_forward_hook(lambda *a: active.__setitem__("on", False))]
    try:
        with mock.patch.object(qwen_module, "dispatch_attention_fn", kernel):
            yield
    finally:
        for h in hooks:
            h.remove()


@pytest.mark.parametrize("quadrant, prompts", [("image->text", PROMPT), ("text->image", PROMPT),
                                              ("image->text", [SHORT, PROMPT])])  # padded: KnockOut under the mask
def test_knock_out_equals_fp64_masked_softmax(pipe, quadrant, prompts):
    n_text = mp.prompt_layout(pipe, PROMPT, height=32, width=40).n_text
    q_stream, k_stream = quadrant.split("->")

    def forbid(s):
        part = {"text": torch.arange(s) < n_text, "image": torch.arange(s) >= n_text}
        return part[q_stream][:, None] & part[k_stream][None, :]

    with reference_kernel(pipe.transformer, 1, forbid):
        reference = run(pipe, prompts)
    with mp.intervene(pipe, mp.KnockOut(quadrant, layers=[1])), mp.AttentionRecorder(pipe) as rec:
        out = run(pipe, prompts)
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)
    assert (out - run(pipe, prompts)).abs().max() > 1e-4  # the knock-out changed the output: the comparison can fail
    qi, ki = ("image", "text").index(q_stream), ("image", "text").index(k_stream)
    m = rec.result.mass.values[:, :, 0, :, :, qi, ki]  # [step, layer, batch, head]
    assert (m[:, 1] == 0).all() and (m[:, [0, 2]] > 0).all()
    assert_restored(pipe)


def assert_restored(pipe):
    tr = pipe.transformer
    assert all(type(p) is QwenDoubleStreamAttnProcessor2_0 for p in tr.attn_processors.values())
    assert not tr._forward_pre_hooks and not tr._forward_hooks and not pipe.text_encoder._forward_hooks
    assert "_mmdit_probe_controller" not in tr.__dict__


@pytest.mark.parametrize("make", [lambda p: mp.AttentionRecorder(p, words=True),
                                  lambda p: mp.intervene(p, mp.AblateHeads(layers=[1], heads=[0]))])
def test_restored_after_an_exception(pipe, make):
    base = run(pipe, num_inference_steps=1)
    with pytest.raises(RuntimeError, match="boom"):
        with make(pipe):
            run(pipe, num_inference_steps=1)
            raise RuntimeError("boom")
    assert_restored(pipe)
    assert torch.equal(run(pipe, num_inference_steps=1), base)


def test_bad_input_is_refused_before_compute(pipe):
    assert resolve_family(pipe).label == "Qwen-Image"
    tr = pipe.transformer
    inputs = dict(hidden_states=torch.zeros(1, 160, 16), encoder_hidden_states=torch.zeros(1, 5, 32),
                  timestep=torch.tensor([0.5]), img_shapes=[[(1, 8, 10), (1, 8, 10)]], return_dict=False)
    computed = tr.img_in.register_forward_pre_hook(lambda *a: pytest.fail("the transformer computed"))
    try:
        with mp.AttentionRecorder(tr), pytest.raises(NotImplementedError, match="Qwen-Image-Edit"):
            tr(**inputs)
    finally:
        computed.remove()
    assert_restored(pipe)
    tr.transformer_blocks[0].attn.set_processor(AttnProcessor2_0())
    try:
        with pytest.raises(TypeError, match="QwenDoubleStreamAttnProcessor2_0"):
            with mp.AttentionRecorder(pipe):
                pass
    finally:
        tr.transformer_blocks[0].attn.set_processor(QwenDoubleStreamAttnProcessor2_0())
    assert_restored(pipe)


def test_load_pipeline_reads_a_qwen_image_folder(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "qwen")
    loaded = mp.load_pipeline(tmp_path / "qwen", local_files_only=True)
    assert type(loaded).__name__ == "QwenImagePipeline"
    loaded.set_progress_bar_config(disable=True)
    base = run(loaded)
    with mp.AttentionRecorder(loaded, words=True) as rec:
        out = run(loaded)
    assert torch.equal(out, base) and rec.result.meta["family"] == "qwen_image"
    assert rec.result.layouts[0] == mp.prompt_layout(pipe, PROMPT, height=32, width=40)

@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_padded_batch_on_cuda(dtype):
    pipe = tiny_qwen_image_pipeline(seed=1, num_layers=N_LAYERS, torch_dtype=dtype, device="cuda")
    kw = dict(generator=torch.Generator("cuda").manual_seed(0), **KW)
    with kernel_inputs(pipe.transformer) as seen:
        base = pipe([SHORT, PROMPT], **kw).images
    kw["generator"] = torch.Generator("cuda").manual_seed(0)
    with mp.AttentionRecorder(pipe) as rec:
        out = pipe([SHORT, PROMPT], **kw).images
    assert torch.equal(out, base)
    n_text = rec.result.layouts[0].n_text
    for i, (q, k, mask) in enumerate(seen):
        keep = keep_of(q, k, mask)
        P = probabilities(q, k, keep.to(q.device))
        got = rec.result.mass.values[divmod(i, N_LAYERS) + (0,)].double()  # [batch, H, query, key]
        ref = P[:, :, n_text:, :n_text].sum(-1).mean(-1)  # image->text
        tol = 2e-2 if dtype == torch.bfloat16 else 2e-5
        torch.testing.assert_close(got[:, :, 0, 1].cpu(), ref.cpu(), atol=tol, rtol=0)
