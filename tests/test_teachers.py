"""Tests of teachers.py through extract.py: tiny-sd21 and tiny-sdxl built from configs (random,
seeded), their CLIP tokenizers built in memory, CPU, nothing downloaded.

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python -m pytest -q tests/test_teachers.py   # ~20 s
"""
import copy

import pytest
import torch

import data
import extract
import models
import teachers
from conftest import extract_and_check_store, write_dataset
from test_clip_words import sd_clip  # noqa: F401 -- SD v1.4's real CLIP tokenizer (a fixture)

TINY = ("tiny-sd21", "tiny-sdxl")
FAST = dict(inversion_steps=2, denoise_steps=3)


@pytest.fixture(scope="module", params=TINY)
def dm(request):
    return models.load_dm(request.param)


def unet_inputs(dm, batch=2, seed=1):
    """(latents, t, context, added) for one UNet call on random latents and two answers."""
    torch.manual_seed(seed)
    context, added = teachers.encode_text(dm, ["a red dog", "two blue circle"][:batch])
    return torch.randn(batch, 4, 16, 16), 500, context, added


def attn2_modules(unet):
    return [m for name, m in unet.named_modules() if name.endswith("attn2")]


# ---- words: one rule for every tokenizer -------------------------------------------------------

def test_sd21_tokenizer_pads_with_bang_and_positions_do_not_move():
    """SD 2's tokenizer pads with "!" (not the end token): the padding comes after the end token,
    so the word positions are tiny-sd's, and the causal text encoder's states up to the end token
    do not depend on it."""
    sd21, sd = models.load_dm("tiny-sd21"), models.load_dm("tiny-sd")
    tok = sd21["tokenizer"]
    ids = tok("a red dog", padding="max_length", max_length=77).input_ids
    a, red, dog, bang = tok.convert_tokens_to_ids(["a</w>", "red</w>", "dog</w>", "!"])
    assert ids[:6] == [0, a, red, dog, 1, bang] and set(ids[5:]) == {bang}  # start, words, end, !
    assert tok.pad_token == "!" and tok.pad_token_id != tok.eos_token_id
    assert extract.text_words(tok, "a red dog") == (["a", "red", "dog"], [[[1]], [[2]], [[3]]])
    text = "A red circle? An elephant, red dog's RED"
    assert extract.text_words(tok, text) == extract.text_words(sd["tokenizer"], text)
    # the same text padded with "!" or with the end token: the same states at positions 0..end
    bang_ids = torch.tensor([ids])
    end_ids = torch.where(bang_ids == bang, torch.tensor(1), bang_ids)
    with torch.no_grad():
        x, y = (sd21["text_encoder"](i)[0] for i in (bang_ids, end_ids))
    assert torch.allclose(x[:, :5], y[:, :5], atol=1e-6) and not torch.allclose(x, y)


def test_sdxl_tokenizers_give_the_same_positions():
    """SDXL's two tokenizers are one BPE: the same ids up to the end token, the same words and
    positions; only the padding differs (end token, "!"), so a column is one token for both."""
    dm = models.load_dm("tiny-sdxl")
    one, two = dm["tokenizer"], dm["tokenizer_2"]
    text = "A red circle? An elephant, red dog's RED"
    assert extract.text_words(one, text) == extract.text_words(two, text)
    a, b = (t(text, padding="max_length", max_length=77).input_ids for t in (one, two))
    end = a.index(1)
    assert a[:end + 1] == b[:end + 1]
    assert set(a[end:]) == {1} and set(b[end + 1:]) == {two.pad_token_id}


def test_real_vocabulary_bang_padding_is_id_0_after_the_end_token(sd_clip):  # noqa: F811
    """On CLIP's real BPE: SD 2's tokenizer (and SDXL's second) is SD 1.4's padding with "!",
    id 0; the text's ids and the words' positions are SD 1.4's, the padding follows the end."""
    sd2 = copy.deepcopy(sd_clip)
    sd2.pad_token = "!"
    text = "A dog's toy, don't! 25 elephants"
    ids = sd2(text, padding="max_length", max_length=77).input_ids
    plain = sd_clip(text).input_ids                                  # start, pieces, end (49407)
    assert sd2.pad_token_id == 0 and ids == plain + [0] * (77 - len(plain))
    assert sd_clip("a dog", padding="max_length", max_length=77).input_ids[3:] == [49407] * 74
    assert extract.text_words(sd2, text) == extract.text_words(sd_clip, text)


def test_sdxl_conditioning_is_the_pipelines():
    """context: both encoders' penultimate states side by side (32 + 48); text_embeds: encoder 2's
    pooled projection; time_ids: (h, w, 0, 0, h, w) of an uncropped res x res image."""
    dm = models.load_dm("tiny-sdxl")
    context, added = teachers.encode_text(dm, ["a red dog"])
    ids = [teachers.token_ids(dm[t], dm[e], ["a red dog"], "cpu")
           for t, e in (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"))]
    with torch.no_grad():
        one = dm["text_encoder"](ids[0], output_hidden_states=True)
        two = dm["text_encoder_2"](ids[1], output_hidden_states=True)
    assert context.shape == (1, 77, 80)
    assert torch.equal(context, torch.cat([one.hidden_states[-2], two.hidden_states[-2]], -1))
    assert torch.equal(added["text_embeds"], two.text_embeds) and two.text_embeds.shape == (1, 48)
    assert added["time_ids"].tolist() == [[32, 32, 0, 0, 32, 32]]


# ---- capture --------------------------------------------------------------------------------

def test_capture_leaves_unet_output_unchanged(dm):
    """The capture processors on every attn2 (diffusers' SDPA processor on attn1) give the UNet
    output of diffusers' default processors; each pixel's mean map sums to 1."""
    unet = dm["unet"]
    x, t, context, added = unet_inputs(dm)
    with torch.no_grad():
        plain = unet(x, t, encoder_hidden_states=context, added_cond_kwargs=added).sample
        store = teachers.new_store((16, 16), columns=77)
        with extract.capturing(unet, store):
            kinds = {n: type(p).__name__ for n, p in unet.attn_processors.items()}
            captured = unet(x, t, encoder_hidden_states=context, added_cond_kwargs=added).sample
    assert torch.allclose(plain, captured, atol=1e-5), (plain - captured).abs().max()
    assert all(k == ("CrossAttentionCapture" if n.endswith("attn2.processor")
                     else "AttnProcessor2_0") for n, k in kinds.items())
    assert all(type(p).__name__ == "AttnProcessor2_0" for p in unet.attn_processors.values())
    assert store["count"] == len(attn2_modules(unet))  # tiny-sd21: 7, tiny-sdxl: 11
    assert torch.allclose((store["sum"] / store["count"]).sum(1), torch.ones(2, 16, 16), atol=1e-5)


def test_captured_probabilities_are_softmax_by_hand(dm):
    """eq. 13 on an attn2 module of the mid block, its inputs read by a forward hook in a plain
    UNet run: the capture's output is the module's, its map softmax(QK^T / sqrt(d)) averaged
    over heads."""
    attn = dm["unet"].mid_block.attentions[0].transformer_blocks[-1].attn2   # the deepest grid
    seen = {}
    hook = attn.register_forward_hook(lambda m, args, kwargs, out: seen.update(
        x=args[0], ctx=kwargs["encoder_hidden_states"], out=out), with_kwargs=True)
    x, t, context, added = unet_inputs(dm)
    with torch.no_grad():
        dm["unet"](x, t, encoder_hidden_states=context, added_cond_kwargs=added)
        hook.remove()
        (B, N, _), H = seen["x"].shape, attn.heads
        side = int(N ** 0.5)
        store = teachers.new_store((side, side), columns=77)
        out = extract.CrossAttentionCapture(store)(attn, seen["x"], seen["ctx"])
        q = attn.to_q(seen["x"]).view(B, N, H, -1).transpose(1, 2)                # (B, H, N, d)
        k = attn.to_k(seen["ctx"]).view(B, 77, H, -1).transpose(1, 2)             # (B, H, T, d)
        ref = (q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).softmax(-1).mean(1)  # (B, N, T)
    assert torch.allclose(out, seen["out"], atol=1e-5)
    assert torch.allclose(store["sum"], ref.transpose(1, 2).reshape(B, 77, side, side), atol=1e-6)


def test_sdxl_has_attention_at_the_inner_levels_only():
    """16x16 latents: attn2 at 8x8 (factor 2: SDXL's 64x64 at 1024 px) and 4x4 (factor 4: its
    32x32), none at full resolution; a filter matching no level is refused by name."""
    dm = models.load_dm("tiny-sdxl")
    x, t, context, added = unet_inputs(dm, batch=1)
    with torch.no_grad():
        for factors, count in (({2}, 3), ({4}, 8), ({1}, 0)):
            store = teachers.new_store((16, 16), columns=5, factors=factors)
            with extract.capturing(dm["unet"], store):
                dm["unet"](x, t, encoder_hidden_states=context, added_cond_kwargs=added)
            assert store["count"] == count
    image = torch.zeros(1, 3, 32, 32)
    with pytest.raises(ValueError, match=r"--layers \{1\} matches no attn2 layer"):
        extract.dm_attention(dm, image, ["a red dog"], 4, layers={1}, **FAST)


# ---- v-prediction ---------------------------------------------------------------------------

def test_sd21_grids_predict_v_and_the_steps_read_it_so():
    """tiny-sd21's DDIM grids keep prediction_type v_prediction; from the true
    v = √ᾱ ε - √(1-ᾱ) x_0 (Salimans & Ho 2022) the denoising step recovers x_0, and the
    inversion step lands on the noisier level's √ᾱ' x_0 + √(1-ᾱ') ε."""
    inverse, forward = extract.ddim_grids(models.load_dm("tiny-sd21")["scheduler"], 5, 5)
    assert inverse.config.prediction_type == forward.config.prediction_type == "v_prediction"
    torch.manual_seed(0)
    x0, eps = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    abar = forward.alphas_cumprod

    def noised(t):  # (x_t, v_t)
        a, s = abar[t].sqrt(), (1 - abar[t]).sqrt()
        return a * x0 + s * eps, a * eps - s * x0
    x_t, v = noised(599)
    assert torch.allclose(forward.step(v, 599, x_t).pred_original_sample, x0, atol=1e-4)
    # the inversion step 399 -> 599 reads the UNet at its target, 599
    x_low, v_low = noised(399)
    assert torch.allclose(inverse.step(v_low, 599, x_low).prev_sample, x_t, atol=1e-4)


# ---- end to end -----------------------------------------------------------------------------

@pytest.mark.parametrize("name", TINY + ("tiny-sd3",))
def test_extract_writes_the_one_store_format(name, tmp_path):
    """Every teacher, SD3's MM-DiT (mmdit.py) included, writes the one store format."""
    dm = models.load_dm(name)
    items = data.read_items(write_dataset(tmp_path, n=3, with_attn=False))
    settings = extract_and_check_store(dm, items, tmp_path / "out", **FAST)
    assert all(meta["layers"] == "all" for meta in settings)


def test_sdxl_refuses_null_text_before_any_work(tmp_path):
    items = data.read_items(write_dataset(tmp_path, n=1, with_attn=False))
    with pytest.raises(ValueError, match="--inversion null-text with --dm tiny-sdxl"):
        extract.extract(items, models.load_dm("tiny-sdxl"), tmp_path / "out", inversion="null-text",
                        inversion_steps=2, progress=False)
    assert not list((tmp_path / "out").glob("*.safetensors"))


# ---- presets and loading ----------------------------------------------------------------------

def test_sdxl_folder_loads_through_the_same_path(tmp_path):
    """save_dm writes SDXL's component layout (text_encoder_2/, tokenizer_2/ too); load_dm reads it
    back to the same conditioning and UNet output."""
    built = models.load_dm("tiny-sdxl")
    models.save_dm(built, tmp_path / "sdxl")
    assert all((tmp_path / "sdxl" / part).is_dir() for part in teachers.SECOND_ENCODER)
    loaded = models.load_dm("tiny-sdxl", path=tmp_path / "sdxl")
    assert type(loaded["text_encoder_2"]).__name__ == "CLIPTextModelWithProjection"
    assert loaded["tokenizer_2"].pad_token == "!" and loaded["res"] == 32
    x, t, context, added = unet_inputs(built)
    again = teachers.encode_text(loaded, ["a red dog", "two blue circle"])
    assert torch.allclose(again[0], context)
    assert torch.allclose(again[1]["text_embeds"], added["text_embeds"])
    with torch.no_grad():
        a = built["unet"](x, t, encoder_hidden_states=context, added_cond_kwargs=added).sample
        b = loaded["unet"](x, t, encoder_hidden_states=context, added_cond_kwargs=added).sample
    assert torch.allclose(a, b, atol=1e-6)


def test_sdxl_vae_stays_float32_under_float16():
    """SDXL's VAE overflows float16 (diffusers' force_upcast): it stays float32, the rest is
    cast."""
    dm = models.load_dm("tiny-sdxl", dtype=torch.float16)
    assert dm["vae"].dtype == torch.float32
    assert (dm["unet"].dtype == dm["text_encoder"].dtype == dm["text_encoder_2"].dtype
            == torch.float16)
    assert models.load_dm("tiny-sd21", dtype=torch.float16)["vae"].dtype == torch.float16


@pytest.mark.parametrize("name", ["sd21", "sdxl"])
def test_real_preset_without_weights_fails_with_a_clear_message(name, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SystemExit, match=rf"--dm {name}\b.*--dm-path") as err:
        models.load_dm(name)
    assert models.PRESETS[name]["hub_id"] in str(err.value)
