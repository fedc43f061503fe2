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
from conftest import write_dataset

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
        store = extract.new_store((8, 8), columns=77)
        with mmdit.capturing(tr, store):
            kinds = {type(p).__name__ for p in tr.attn_processors.values()}
            captured = mmdit.velocity(dm, x, s, context, pooled)
    assert torch.allclose(plain, captured, atol=1e-5), (plain - captured).abs().max()
    assert kinds == {"JointCapture"}
    assert {type(p).__name__ for p in tr.attn_processors.values()} == {"JointAttnProcessor2_0"}
    assert store["count"] == len(tr.transformer_blocks) == 2


def test_captured_probabilities_are_the_joint_softmax_by_hand(dm):
    """eq. 13 on the first block, its inputs read by a forward hook in a plain run: the capture's
    output is the module's, its map the image rows of softmax(QK^T / sqrt(d)) over all N + T keys
    at the text columns, averaged over heads."""
    attn = dm["transformer"].transformer_blocks[0].attn
    seen = {}
    hook = attn.register_forward_hook(lambda m, args, kwargs, out: seen.update(
        x=kwargs["hidden_states"], ctx=kwargs["encoder_hidden_states"], out=out), with_kwargs=True)
    x, s, context, pooled = inputs(dm)
    with torch.no_grad():
        mmdit.velocity(dm, x, s, context, pooled)
        hook.remove()
        (B, N, _), H = seen["x"].shape, attn.heads
        store = extract.new_store((8, 8), columns=77)
        out = mmdit.JointCapture(store)(attn, seen["x"], seen["ctx"])

        def heads(t):
            return t.view(B, -1, H, t.shape[-1] // H).transpose(1, 2)        # (B, H, L, d)
        q = torch.cat([heads(attn.to_q(seen["x"])), heads(attn.add_q_proj(seen["ctx"]))], 2)
        k = torch.cat([heads(attn.to_k(seen["x"])), heads(attn.add_k_proj(seen["ctx"]))], 2)
        P = (q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).softmax(-1)          # (B, H, N+T, N+T)
        ref = P[:, :, :N, N:].mean(1)                                            # (B, N, 77)
    assert attn.norm_q is None  # tiny-sd3, as SD3 medium: no qk norm, so q and k are as above
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(out, seen["out"]))
    assert torch.allclose(store["sum"], ref.transpose(1, 2).reshape(B, 77, 8, 8), atol=1e-6)


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
        x0 = mmdit.encode_image(dm, images)
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
