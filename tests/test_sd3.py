"""Tests of mmdit.py through extract.py: tiny-sd3 built from configs (random, seeded), its CLIP
tokenizer built in memory, CPU, nothing downloaded.

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python -m pytest -q tests/test_sd3.py   # ~10 s
"""
import pytest
import torch

import data
import extract
import mmdit
import models
import teachers
from conftest import extract_and_check_store, write_dataset

FAST = dict(inversion_steps=2, denoise_steps=3)
TEXTS = ["a red dog", "two blue circle"]


@pytest.fixture(scope="module")
def dm():
    return models.load_dm("tiny-sd3")


def inputs(dm, seed=1):
    """(latents (2, 16, 16, 16), sigma, context, pooled) for one transformer call."""
    torch.manual_seed(seed)
    context, pooled = mmdit.encode_text(dm, TEXTS)
    return torch.randn(2, 16, 16, 16), 0.5, context, pooled


# ---- capture ------------------------------------------------------------------------------------

def test_capture_leaves_transformer_output_unchanged(dm):
    """JointCapture on every joint block gives the default processors' output, then is removed."""
    tr = dm["transformer"]
    x, s, context, pooled = inputs(dm)
    with torch.no_grad():
        plain = mmdit.velocity(dm, x, s, context, pooled)
        store = teachers.new_store((8, 8), columns=77)
        with mmdit.capturing(tr, store):
            kinds = {type(p).__name__ for p in tr.attn_processors.values()}
            captured = mmdit.velocity(dm, x, s, context, pooled)
    assert torch.allclose(plain, captured, atol=1e-5), (plain - captured).abs().max()
    assert kinds == {"JointCapture"}
    assert {type(p).__name__ for p in tr.attn_processors.values()} == {"JointAttnProcessor2_0"}
    assert store["count"] == len(tr.transformer_blocks) == 2


def first_block_by_hand(dm, kind):
    """The first joint block's run by JointCapture of `kind` on the inputs a forward hook read in
    a plain run, beside the same attention by hand. Returns (capture's output, the module's
    output, store, P (B, H, N+T, N+T) the joint softmax, O (B, N+T, H d) = P V, N)."""
    attn = dm["transformer"].transformer_blocks[0].attn
    seen = {}
    hook = attn.register_forward_hook(lambda m, args, kwargs, out: seen.update(
        x=kwargs["hidden_states"], ctx=kwargs["encoder_hidden_states"], out=out), with_kwargs=True)
    x, s, context, pooled = inputs(dm)
    with torch.no_grad():
        mmdit.velocity(dm, x, s, context, pooled)
        hook.remove()
        (B, N, _), H = seen["x"].shape, attn.heads
        store = teachers.new_store((8, 8), columns=77)
        out = mmdit.JointCapture(store, kind, text_length=77)(attn, seen["x"], seen["ctx"])

        def heads(t):
            return t.view(B, -1, H, t.shape[-1] // H).transpose(1, 2)        # (B, H, L, d)
        projections = ((attn.to_q, attn.add_q_proj), (attn.to_k, attn.add_k_proj),
                       (attn.to_v, attn.add_v_proj))
        q, k, v = (torch.cat([heads(own(seen["x"])), heads(added(seen["ctx"]))], 2)
                   for own, added in projections)
        P = (q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).softmax(-1)          # (B, H, N+T, N+T)
        O = (P @ v).transpose(1, 2).reshape(B, N + context.shape[1], -1)        # (B, N+T, H d)
    # tiny-sd3, as SD3 medium: no qk norm, so q and k are as above
    assert attn.norm_q is None
    return out, seen["out"], store, P, O, N


def test_captured_probabilities_are_the_joint_softmax_by_hand(dm):
    """eq. 13 on the first block: the capture's output is the module's, its map the image rows
    of softmax(QK^T / sqrt(d)) over all N + T keys at the text columns, averaged over heads."""
    out, module_out, store, P, _, N = first_block_by_hand(dm, "joint")
    ref = P[:, :, :N, N:].mean(1)                                                # (B, N, 77)
    B = len(ref)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(out, module_out))
    assert torch.allclose(store["sum"], ref.transpose(1, 2).reshape(B, 77, 8, 8), atol=1e-6)


def test_output_space_map_is_the_softmax_of_output_similarities_by_hand(dm):
    """--dit-map output on the first block: the capture's output is the module's; its map is
    softmax over the 77 text columns of O_img O_txt^T, O = P V the joint attention's output
    before its projections (heads side by side), each row summing to 1."""
    out, module_out, store, _, O, N = first_block_by_hand(dm, "output")
    ref = (O[:, :N] @ O[:, N:N + 77].transpose(1, 2)).softmax(-1)               # (B, N, 77)
    B = len(ref)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(out, module_out))
    maps = store["sum"]                                                          # (B, 77, 8, 8)
    assert torch.allclose(maps, ref.transpose(1, 2).reshape(B, 77, 8, 8), atol=1e-5)
    assert torch.allclose(maps.sum(1), torch.ones(B, 8, 8), atol=1e-5)


def test_output_space_map_does_not_depend_on_the_batchs_longest_text(dm):
    """The same image and answer give the same output-space map of their first columns whether
    the batch keeps 4 text columns or 12 (the softmax spans the fixed CLIP rows)."""
    images = torch.rand(1, 3, 32, 32) * 2 - 1
    short, wide = (extract.dm_attention(dm, images, TEXTS[:1], columns, dit_map="output", **FAST)
                   for columns in (4, 12))
    assert torch.allclose(short, wide[:, :4], atol=1e-6)


def test_output_space_map_is_written_into_the_store_and_refused_for_a_unet(dm, tmp_path):
    """--dit-map output: the store says so (the joint map, the default, adds no key); a UNet
    teacher refuses it before any work, and an unknown kind is refused by name."""
    path = write_dataset(tmp_path, n=1, with_attn=False)
    items = data.read_items(path)
    extract.extract(items, dm, tmp_path / "out", dit_map="output", progress=False, **FAST)
    extract.extract(items, dm, tmp_path / "joint", progress=False, **FAST)
    meta = {name: data.load_maps(data.maps_path(tmp_path / name, items[0]["id"]))[2]
            for name in ("out", "joint")}
    assert meta["out"]["dit_map"] == "output" and "dit_map" not in meta["joint"]
    with pytest.raises(ValueError, match="--dit-map output with --dm tiny-sd"):
        extract.extract(items, models.load_dm("tiny-sd"), tmp_path / "unet", dit_map="output",
                        progress=False, **FAST)
    command = ["--dm", "tiny-sd", "--dit-map", "output", "--data", str(path), "--out", "x"]
    with pytest.raises(SystemExit, match="only SD3's joint attention"):
        extract.main(command)
    with pytest.raises(ValueError, match="--dit-map 'outputs'"):
        mmdit.JointCapture(teachers.new_store((8, 8), 77), "outputs")


def test_image_rows_over_text_columns_are_shares_of_all_keys(dm):
    """Each pixel's text share is in (0, 1): the softmax also spans the image keys. The mean map
    has the (H/patch) x (W/patch) token grid."""
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    attention = extract.dm_attention(dm, images, TEXTS, 77, **FAST)            # (2, 77, 8, 8)
    assert attention.shape == (2, 77, 8, 8) and (attention >= 0).all()
    share = attention.sum(1)                                                    # (2, 8, 8)
    assert (share > 0).all() and (share < 1 - 1e-3).all()


# ---- extraction ---------------------------------------------------------------------------------

# the store format: tests/test_teachers.py::test_extract_writes_the_one_store_format


def test_sd3_refuses_null_text_and_layer_factors(dm, tmp_path):
    items = data.read_items(write_dataset(tmp_path, n=1, with_attn=False))
    with pytest.raises(ValueError, match="--inversion null-text with --dm tiny-sd3"):
        extract.extract(items, dm, tmp_path / "out", inversion="null-text", inversion_steps=2,
                        progress=False)
    with pytest.raises(ValueError, match="--layers"):
        extract.extract(items, dm, tmp_path / "out", layers={2}, progress=False, **FAST)


# ---- flow inversion -----------------------------------------------------------------------------

def test_flow_inversion_then_denoising_reconstructs_the_latent(dm):
    """Euler inversion 0 -> 1 then Euler denoising 1 -> 0 comes back close to the clean latent,
    closer with more steps (Euler's error is first order in the step); denoising fresh noise on
    the same grid does not (the test can fail). A random tiny model's flow is far from straight,
    so its error at 5 steps (~0.2 of the latent's variance) is larger than a trained model's."""
    torch.manual_seed(0)
    images = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        x0 = teachers.encode_image(dm, images)
        context, pooled = mmdit.encode_text(dm, TEXTS[:1])
        error = {n: (mmdit.invert_and_denoise(dm, x0, context, pooled, n, n) - x0).pow(2).mean()
                 for n in (5, 10)}
        other, grid = torch.randn_like(x0), mmdit.flow_sigmas(dm["scheduler"], 10)
        for s, s_next in zip(grid[:-1], grid[1:]):  # the same denoising, from fresh noise
            other = other + (s_next - s) * mmdit.velocity(dm, other, s, context, pooled)
    assert error[10] < 0.1 * x0.var() and error[5] < 0.3 * x0.var(), (error, x0.var())
    assert error[10] < error[5] / 2
    assert (other - x0).pow(2).mean() > 0.5 * x0.var()


def test_flow_grids_run_from_noise_to_clean():
    from diffusers import FlowMatchEulerDiscreteScheduler
    sigmas = mmdit.flow_sigmas(FlowMatchEulerDiscreteScheduler(shift=mmdit.SHIFT), 5)
    assert len(sigmas) == 6 and sigmas[0] == 1 and sigmas[-1] == 0
    assert (sigmas[1:] < sigmas[:-1]).all()


# ---- presets and loading ------------------------------------------------------------------------

def test_real_preset_without_weights_fails_with_a_clear_message(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SystemExit, match=r"--dm sd3\b.*--dm-path") as err:
        models.load_dm("sd3")
    assert models.PRESETS["sd3"]["hub_id"] in str(err.value)


# ---- the real preset's three encoders -----------------------------------------------------------

def three_encoder_sd3(seed=0):
    """An SD3 folder's parts at a tiny size: two CLIPs with projections (16 and 24 channels), a T5
    encoder (48 channels) with a word-level tokenizer built in memory, the transformer reading
    their 48-channel context and 40-channel pooled vector."""
    import copy

    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from tokenizers import Tokenizer, models as tok_models, pre_tokenizers, processors
    from transformers import (CLIPTextConfig, CLIPTextModelWithProjection, PreTrainedTokenizerFast,
                              T5Config, T5EncoderModel)
    clip = teachers.clip_tokenizer(teachers.TINY_SD_WORDS, teachers.TINY_SD_ALPHABET, max_length=77)
    clip_g = copy.deepcopy(clip)
    clip_g.pad_token = "!"
    vocab = {w: i for i, w in enumerate(["<pad>", "</s>", "<unk>", *teachers.TINY_SD_WORDS])}
    t5_tok = Tokenizer(tok_models.WordLevel(vocab, unk_token="<unk>"))
    t5_tok.pre_tokenizer = pre_tokenizers.Whitespace()
    t5_tok.post_processor = processors.TemplateProcessing(single="$A </s>",
                                                          special_tokens=[("</s>", 1)])
    t5_tok = PreTrainedTokenizerFast(tokenizer_object=t5_tok, pad_token="<pad>", eos_token="</s>",
                                     unk_token="<unk>")
    torch.manual_seed(seed)

    def clip_encoder(tokenizer, width):
        ids = teachers.clip_ids(clip, tokenizer.pad_token_id)
        return CLIPTextModelWithProjection(CLIPTextConfig(
            **ids, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
            num_attention_heads=2, max_position_embeddings=77, projection_dim=width))
    t5 = T5EncoderModel(T5Config(vocab_size=len(vocab), d_model=48, d_ff=64, d_kv=8, num_layers=1,
                                 num_heads=2, pad_token_id=0, eos_token_id=1))
    parts = dict(
        text_encoder=clip_encoder(clip, 16), tokenizer=clip,
        text_encoder_2=clip_encoder(clip_g, 24), tokenizer_2=clip_g,
        text_encoder_3=t5, tokenizer_3=t5_tok,
        vae=AutoencoderKL(**mmdit.TINY_SD3["vae"]),
        transformer=SD3Transformer2DModel(**dict(mmdit.TINY_SD3["transformer"],
                                                 joint_attention_dim=48, pooled_projection_dim=40)),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=mmdit.SHIFT))
    # T5 has dropout: compare the models as they infer
    for module in parts.values():
        if isinstance(module, torch.nn.Module):
            module.eval()
    return parts


def test_three_encoder_conditioning_is_the_pipelines():
    """With CLIP-L, CLIP-G and T5, encode_text gives StableDiffusion3Pipeline.encode_prompt's
    context (77 CLIP columns, zero-padded to T5's width, then T5's 256) and pooled vector."""
    from diffusers import StableDiffusion3Pipeline
    parts = three_encoder_sd3()
    pipe = StableDiffusion3Pipeline(**parts)
    with torch.no_grad():
        want, _, want_pooled, _ = pipe.encode_prompt(TEXTS, None, None, device="cpu",
                                                     do_classifier_free_guidance=False)
        context, pooled = mmdit.encode_text(parts, TEXTS)
    assert context.shape == (2, 77 + mmdit.T5_LENGTH, 48) and pooled.shape == (2, 40)
    torch.testing.assert_close(context, want)
    torch.testing.assert_close(pooled, want_pooled)
    assert context[:, :77, 16 + 24:].abs().max() == 0                  # the padding of the CLIPs


def test_real_preset_loads_a_three_encoder_folder_and_writes_the_store(tmp_path):
    """--dm sd3 --dm-path reads a folder in SD3's layout (three encoders) and extracts the CLIP
    words' maps from the image -> CLIP-column block of the joint attention."""
    folder = tmp_path / "sd3"
    for part, module in three_encoder_sd3().items():
        module.save_pretrained(folder / part)
    dm = models.load_dm("sd3", path=folder)
    assert type(dm["text_encoder_3"]).__name__ == "T5EncoderModel" and dm["res"] == 32
    t5 = mmdit.load_folder(folder, encoders=3, dtype=torch.bfloat16)["text_encoder_3"]
    assert t5.dtype == torch.bfloat16                                 # read so, not cast after
    items = data.read_items(write_dataset(tmp_path, n=2, with_attn=False))
    extract_and_check_store(dm, items, tmp_path / "out", **FAST)
