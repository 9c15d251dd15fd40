"""Flux.2: recording is exact and does not perturb; layouts follow the tokenizer; ablations match references.

Reference for exactness: the q/k the attention kernel actually received in a *vanilla* run
(``F.scaled_dot_product_attention`` wrapped while the transformer runs, so the Mistral encoder's own
attention is not captured), softmax in float64. References for ablations: diffusers' own processors
with their kernel (``dispatch_attention_fn``) replaced by an explicit fp64 masked softmax or by zeros,
forward hooks written here, and diffusers' ``LayerSkipConfig`` / ``apply_layer_skip``.
Flux2Pipeline's first positional argument is ``image``: every call passes ``prompt=``.
"""

from __future__ import annotations

import contextlib
import inspect
from types import SimpleNamespace
from unittest import mock

import pytest
import torch
from diffusers import Flux2Pipeline
from diffusers.hooks import LayerSkipConfig, apply_layer_skip
from diffusers.models.transformers import transformer_flux2
from PIL import Image
from tokenizers import Tokenizer, decoders
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast

import mmdit_probe as mp
from mmdit_probe.context import CallContextError
from mmdit_probe.families.flux2 import HIDDEN_LAYERS
from mmdit_probe.families.flux2_layout import chat_ids, chat_layout
from mmdit_probe.layout import WordTruncatedError
from mmdit_probe.tiny_flux2 import make_mistral_tokenizer, tiny_flux2_pipeline
from reference import kernel_inputs

PROMPT = "a red circle left of a blue square"
L = 48  # max_sequence_length: BOS + system message + markers + prompt + padding
KW = dict(height=32, width=40, max_sequence_length=L, num_inference_steps=2)


@pytest.fixture(scope="module")
def pipe():
    return tiny_flux2_pipeline(seed=1)


@pytest.fixture(scope="module")
def plain(pipe):
    return pipe(prompt=PROMPT, generator=torch.manual_seed(0), output_type="latent", **KW).images


def run(pipe, prompt=PROMPT, **extra):
    return pipe(prompt=prompt, generator=torch.manual_seed(0), output_type="latent", **{**KW, **extra}).images


def sites(pipe):
    tr = pipe.transformer
    return [b.attn for b in list(tr.transformer_blocks) + list(tr.single_transformer_blocks)]




@contextlib.contextmanager
def kernel_replaced(pipe, layers, kernel):
    """diffusers' own Flux.2 processors with ``kernel(q, k, v) -> out`` (``[B, S, H, D]``) at ``layers``."""
    current, real = {"layer": None}, transformer_flux2.dispatch_attention_fn
    hooks = [m.register_forward_pre_hook(lambda *a, i=i: current.__setitem__("layer", i))
             for i, m in enumerate(sites(pipe))]

    def dispatch(query, key, value, **kwargs):
        return kernel(query, key, value) if current["layer"] in layers else real(query, key, value, **kwargs)

    try:
        with mock.patch.object(transformer_flux2, "dispatch_attention_fn", dispatch):
            yield
    finally:
        for h in hooks:
            h.remove()


# ---- exactness ----------------------------------------------------------------------------------
def test_recording_is_exact_and_bitwise(pipe):
    prompts = [PROMPT, "a green triangle"]
    maps = [mp.MapSelection(q, layers=[1, 3], steps=[1]) for q in mp.QUADRANTS]
    with kernel_inputs(pipe.transformer) as seen:
        base = run(pipe, prompts)
    with mp.AttentionRecorder(pipe, groups=True, words=True, word_heads="all", entropy=True, key_mass=True,
                              maps=maps) as rec:
        out = run(pipe, prompts)
    assert torch.equal(out, base)
    res = rec.result
    n_layers = 4
    assert len(seen) == 2 * n_layers and res.mass.shape["layer"] == n_layers
    assert res.mass.aux["block_kind"][1] == ("joint", "joint", "single", "single")
    assert [lay.prompt for lay in res.layouts] == prompts and res.branches == ("cond", "cond")
    n_text, n_img = L, res.image_grid[0] * res.image_grid[1]
    assert res.image_grid == (8, 10) and all(lay.order == ("text", "image") and lay.n_text == L for lay in res.layouts)
    txt, img = slice(0, n_text), slice(n_text, n_text + n_img)
    sl = {"text": txt, "image": img}
    for i, (q, k) in enumerate(seen):
        step, layer = divmod(i, n_layers)
        P = torch.softmax(q.double() @ k.double().transpose(-1, -2) / q.shape[-1] ** 0.5, -1)  # [B, H, S, S]
        mass = res.mass.values[step, layer, 0].double()  # [B, H, query, key], (image, text)
        for qi, qs in enumerate((img, txt)):
            for ki, ks in enumerate((img, txt)):
                assert torch.allclose(mass[:, :, qi, ki], P[..., qs, ks].sum(-1).mean(-1), atol=2e-6)
        H = -(P * torch.log(P.clamp_min(1e-300))).sum(-1)
        ent = res.stat("entropy").values[step, layer, 0].double()
        assert torch.allclose(ent, torch.stack([H[..., img].mean(-1), H[..., txt].mean(-1)], -1), atol=2e-5)
        km = res.stat("key_mass").values[step, layer, 0].double()  # [B, H, query, key_token]
        assert torch.allclose(km[:, :, 0], P[..., img, :].sum(-2), atol=2e-4)
        assert torch.allclose(km[:, :, 1], P[..., txt, :].sum(-2), atol=2e-4)
        gm = res.stat("group_mass").values[step, layer, 0].double()  # [B, H, query, key_group]
        wm = res.stat("word_map").values[step, layer, 0].double()  # [B, H, word, image_token]
        for b, lay in enumerate(res.layouts):
            for gi, group in enumerate(mp.KEY_GROUPS):
                pos = lay.group_positions(group)
                for qi, qs in enumerate((img, txt)):
                    assert torch.allclose(gm[b, :, qi, gi], P[b, :, qs][..., pos].sum(-1).mean(-1), atol=2e-6)
            for wi, word in enumerate(res.words):
                if word not in lay.words:  # the other prompt's word: not recorded for this row
                    assert torch.isnan(wm[b, :, wi]).all()
                    continue
                assert torch.allclose(wm[b, :, wi], P[b, :, img][..., lay.word_positions(word)].sum(-1), atol=2e-6)
        if step == 1 and layer in (1, 3):
            for quad in mp.QUADRANTS:
                qs, ks = quad.split("->")
                assert torch.allclose(res.attention_map(1, layer, qs, ks).double(), P[..., sl[qs], sl[ks]], atol=2e-6)


def test_processors_restored_after_exception(pipe, plain):
    tr = pipe.transformer
    before = dict(tr.attn_processors)
    n_hooks = len(tr._forward_pre_hooks) + len(tr._forward_hooks) + len(pipe.text_encoder._forward_hooks)

    def boom(p, i, t, kw):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        with mp.intervene(pipe, mp.KnockOut("image->text", layers=[2])), mp.AttentionRecorder(pipe, words=True):
            pipe(prompt=PROMPT, callback_on_step_end=boom, **KW)
    after = tr.attn_processors
    assert set(after) == set(before) and all(after[k] is before[k] for k in before)
    assert len(tr._forward_pre_hooks) + len(tr._forward_hooks) + len(pipe.text_encoder._forward_hooks) == n_hooks
    assert torch.equal(run(pipe), plain)


# ---- layouts --------------------------------------------------------------------------------------
def test_layout_follows_the_tokenizer_ids(pipe):
    tok = pipe.tokenizer
    with mp.AttentionRecorder(pipe) as rec:
        run(pipe, num_inference_steps=1)
    lay = rec.result.layouts[0]
    assert mp.prompt_layout(pipe, PROMPT, height=32, width=40, max_sequence_length=L) == lay
    ids = [t.token_id for t in lay.text]
    assert ids == chat_ids(tok, PROMPT, pipe.system_message, L)
    real = [t for t in lay.text if t.kind == "real"]
    assert [t.token_id for t in real] == tok(PROMPT, add_special_tokens=False).input_ids
    pad = [i for i, t in enumerate(ids) if t == tok.pad_token_id]
    assert [t.position for t in lay.text if t.kind == "padding"] == pad
    system = tok(pipe.system_message, add_special_tokens=False).input_ids
    # <s> [SYSTEM_PROMPT] system message [/SYSTEM_PROMPT] [INST] … [/INST]
    assert sum(t.kind == "special" for t in lay.text) == len(system) + 5
    for word in ("red", "circle", "square"):
        assert tok.decode([ids[p] for p in lay.word_positions(word)]).strip() == word


def test_words_across_pieces_padding_side_and_truncation(pipe):
    tok = pipe.tokenizer
    prompt = "Café 3d left-hand cube"
    right = chat_layout((2, 2), chat_ids(tok, prompt, pipe.system_message, L), tok, order=("text", "image"))
    left_tok = make_mistral_tokenizer()
    left_tok.padding_side = "left"
    left_ids = chat_ids(left_tok, prompt, pipe.system_message, L)
    assert left_ids[0] == tok.pad_token_id
    left = chat_layout((2, 2), left_ids, left_tok, order=("text", "image"))
    assert right.prompt == left.prompt == prompt and right.words == left.words == ("café", "3d", "left-hand", "cube")
    shift = sum(t.kind == "padding" for t in left.text)
    for word in right.words:
        assert [p + shift for p in right.word_positions(word)] == left.word_positions(word)
        assert tok.decode([right.text[p].token_id for p in right.word_positions(word)]).strip().lower() == word
    # a SentencePiece-style (``▁``) Mistral tokenizer: same kinds and words
    pieces = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "<pad>", "▁red", "▁circ", "le"]
    vocab = {t: i for i, t in enumerate(pieces)}
    backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    backend.decoder = decoders.Metaspace()
    sp = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", pad_token="<pad>",
                                 additional_special_tokens=["[INST]", "[/INST]"])
    lay = chat_layout((1, 1), [1, 3, 6, 7, 8, 4, 5], sp, order=("text", "image"))
    assert lay.prompt == "red circle"
    assert [t.kind for t in lay.text] == ["special"] * 2 + ["real"] * 3 + ["special", "padding"]
    assert lay.word_positions("circle") == [3, 4] and lay.word_positions("red") == [2]
    n_fixed = len(tok(pipe.system_message, add_special_tokens=False).input_ids) + 4  # <s> + 3 markers before the prompt
    cut = mp.prompt_layout(pipe, PROMPT, height=32, width=40, max_sequence_length=n_fixed + 3)
    assert [t.word for t in cut.text if t.kind == "real"] == ["a", "red", "circle"]
    with pytest.raises(WordTruncatedError):
        cut.word_positions("square")


def test_rows_are_matched_by_value(pipe):
    with mp.AttentionRecorder(pipe) as rec:
        run(pipe, [PROMPT, "a green triangle"], num_images_per_prompt=2, num_inference_steps=1)
    assert [lay.prompt for lay in rec.result.layouts] == [PROMPT, PROMPT, "a green triangle", "a green triangle"]
    with mp.AttentionRecorder(pipe) as rec:  # other encoder layers than Flux2Pipeline's default: no layout
        run(pipe, text_encoder_out_layers=(1, 2, 3), num_inference_steps=1)
    assert rec.result.layouts == (None,)
    assert HIDDEN_LAYERS == inspect.signature(Flux2Pipeline.encode_prompt).parameters["text_encoder_out_layers"].default


# ---- refusals -------------------------------------------------------------------------------------
def test_reference_images_and_kv_processors_are_refused(pipe):
    before = dict(pipe.transformer.attn_processors)
    calls = []
    h = pipe.transformer.transformer_blocks[0].register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(CallContextError, match="reference-image tokens"):
            with mp.AttentionRecorder(pipe):
                pipe(image=Image.new("RGB", (64, 64), "white"), prompt=PROMPT, **KW)
    finally:
        h.remove()
    assert not calls and all(pipe.transformer.attn_processors[k] is v for k, v in before.items())
    key = "transformer_blocks.0.attn.processor"
    pipe.transformer.set_attn_processor({**before, key: transformer_flux2.Flux2KVAttnProcessor()})
    try:
        with pytest.raises(TypeError, match="Flux2KVAttnProcessor"):
            mp.AttentionRecorder(pipe).__enter__()
    finally:
        pipe.transformer.set_attn_processor(before)
    assert all(pipe.transformer.attn_processors[k] is v for k, v in before.items())
    other = SimpleNamespace(transformer=pipe.transformer)  # e.g. a Flux2KleinPipeline: Qwen3 text, separate CFG calls
    with pytest.raises(NotImplementedError, match="Flux2Pipeline"):
        mp.prompt_layout(other, PROMPT)


def test_load_pipeline_reads_a_flux2_folder(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "flux2")
    loaded = mp.load_pipeline(tmp_path / "flux2", local_files_only=True)
    assert type(loaded).__name__ == "Flux2Pipeline"
    loaded.set_progress_bar_config(disable=True)
    a = run(loaded)  # loaded weights are memory-mapped (BLAS may round differently from `pipe`): compare loaded runs
    with mp.AttentionRecorder(loaded, words=True) as rec:
        b = run(loaded)
    assert torch.equal(a, b) and rec.result.meta["family"] == "flux2" and rec.result.layouts[0].prompt == PROMPT


# ---- ablations ------------------------------------------------------------------------------------
def test_knock_out_equals_fp64_masked_softmax(pipe, plain):
    n_text = L

    def masked(query, key, value):
        q, k, v = (t.transpose(1, 2).double() for t in (query, key, value))
        logits = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
        logits[:, :, n_text:, :n_text] = float("-inf")  # image queries may not see text keys
        return (torch.softmax(logits, -1) @ v).to(query.dtype).transpose(1, 2)

    with kernel_replaced(pipe, {1, 2}, masked):
        reference = run(pipe)
    with mp.intervene(pipe, mp.KnockOut("image->text", layers=[1, 2])), mp.AttentionRecorder(pipe) as rec:
        out = run(pipe)
    assert torch.allclose(out, reference, atol=1e-5) and not torch.allclose(out, plain, atol=1e-3)
    m = rec.result.mass.values[:, :, 0, 0, :, 0, 1]  # image->text mass [step, layer, head]
    assert (m[:, [1, 2]] == 0).all() and (m[:, [0, 3]] > 0).all()


@pytest.mark.parametrize("layer", [1, 3])  # a double-stream and a single-stream block
def test_skip_attention_equals_a_zero_kernel(pipe, layer):
    with kernel_replaced(pipe, {layer}, lambda q, k, v: torch.zeros_like(q)):
        reference = run(pipe)
    with mp.intervene(pipe, mp.SkipLayers([layer], mode="attention")):
        assert torch.equal(run(pipe), reference)


def test_skip_double_stream_block_equals_identity_block(pipe, plain):
    """diffusers' apply_layer_skip returns (hidden, encoder) where Flux.2's double blocks return (encoder, hidden):
    the reference is an identity block in the block's own order."""
    block = pipe.transformer.transformer_blocks[1]
    h = block.register_forward_hook(lambda m, a, kw, o: (kw["encoder_hidden_states"], kw["hidden_states"]),
                                    with_kwargs=True)
    try:
        reference = run(pipe)
    finally:
        h.remove()
    with mp.intervene(pipe, mp.SkipLayers([1])):
        out = run(pipe)
    assert torch.equal(out, reference) and not torch.equal(out, plain)


def test_skip_single_stream_block_equals_diffusers_layer_skip(pipe, plain):
    """Single-stream blocks take and return the joined [text, image] sequence (the family's JoinedStream I/O)."""
    apply_layer_skip(pipe.transformer, LayerSkipConfig(indices=[0], fqn="single_transformer_blocks"))
    try:
        reference = run(pipe)
    finally:
        pipe.transformer._diffusers_hook.remove_hook("layer_skip_hook", recurse=True)
    assert not torch.equal(reference, plain)
    with mp.intervene(pipe, mp.SkipLayers([2])):
        assert torch.equal(run(pipe), reference)


def test_zero_text_words_on_a_double_stream_block(pipe, plain):
    lay = mp.prompt_layout(pipe, PROMPT, height=32, width=40, max_sequence_length=L)
    pos = [p - lay.text_slice.start for p in lay.word_positions("red")]

    def zero(module, args, kwargs):
        ehs = kwargs["encoder_hidden_states"].clone()
        ehs[:, pos] = 0
        return args, {**kwargs, "encoder_hidden_states": ehs}

    h = pipe.transformer.transformer_blocks[1].register_forward_pre_hook(zero, with_kwargs=True)
    try:
        reference = run(pipe)
    finally:
        h.remove()
    with mp.intervene(pipe, mp.ZeroText(layers=[1], words=["red"])):
        out = run(pipe)
    assert torch.equal(out, reference) and not torch.equal(out, plain)
