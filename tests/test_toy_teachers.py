"""Tests of toy_teachers.py: the SD 2-, SDXL- and SD3-style toy teachers train on the miniature
world, save in their families' layouts, load through models.load_dm and write the one store.

CPU only, nothing downloaded; toy-sd's shipped VAE is read as it is.
Run: python -m pytest -q tests/test_toy_teachers.py
"""
import json
import math

import pytest
import torch

import data
import models
import toy_teachers
import world
from conftest import extract_and_check_store

NAMES = ("toy-sd21", "toy-sdxl", "toy-sd3")


@pytest.mark.parametrize("name", NAMES)
def test_toy_teacher_trains_saves_loads_and_writes_the_store(name, small_world, tmp_path):
    root, paths = small_world
    out = toy_teachers.train(name, tmp_path / name, root, seed=3, steps=2, batch=4)
    summary = json.loads((out / "training.json").read_text())
    assert (summary["name"], summary["steps"]) == (name, 2)
    # loss = denoising + LOCALISE x localisation, whose three region means of attention shares
    # lie in [0, 1]: the localisation term lies in [-1, 2]
    local = (summary["final_loss"] - summary["final_denoise_mse"]) / summary["localise"]
    assert math.isfinite(summary["final_loss"]) and -1.001 <= local <= 2.001
    dm = models.load_dm(name, path=str(out))
    assert dm["res"] == world.SIZE and ("text_encoder_2" in dm) == (name == "toy-sdxl")
    items = [it for it in data.read_items(paths["test-id"]) if it.get("masks")][:2]
    layers = models.PRESETS[name]["layers"]
    settings = extract_and_check_store(dm, items, tmp_path / "attn", inversion_steps=2,
                                       denoise_steps=2, layers=layers)
    expected = ",".join(map(str, sorted(layers))) if layers else "all"
    assert [meta["layers"] for meta in settings] == [expected] * 2


@pytest.mark.parametrize("name", NAMES)
def test_the_localisation_loss_reaches_every_text_encoder_and_the_attention(name, small_world,
                                                                             monkeypatch):
    """With the denoising loss zeroed, the localisation loss alone (through the captured maps)
    gives a gradient to every text encoder and to the keys of the text-to-image attention: the
    capture keeps the graph. One step's gradients are read where fit_base would step."""
    root, paths = small_world
    vae = models.load_dm_folder(models.ROOT / "toy_models" / "toy-sd")["vae"]
    dm = dict(toy_teachers.build(name, vae.eval().requires_grad_(False)), name=name)
    denoising = toy_teachers.denoising_loss
    monkeypatch.setattr(toy_teachers, "denoising_loss", lambda *a: denoising(*a) * 0)
    grads = {}

    def one_step(params, loss_of_step, steps, lr, desc, after_step=None, show=True):
        loss_of_step(0).backward()
        grads.update({n: p.grad for part in ("text_encoder", "text_encoder_2", "unet",
                                             "transformer") if part in dm
                      for n, p in dm[part].named_parameters(prefix=part)})
        return [0.0]
    monkeypatch.setattr(toy_teachers, "fit_base", one_step)
    scenes = [it["objects"] for it in data.read_items(paths["pretrain"])][:4]
    latents = torch.randn(4, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    toy_teachers.fit(dm, latents, scenes, steps=1, batch=4, lr=1e-3, seed=0)
    reached = lambda prefix, key: any(  # noqa: E731
        n.startswith(prefix) and key in n and g is not None and g.abs().sum() > 0
        for n, g in grads.items())
    assert reached("text_encoder.", "") and (name != "toy-sdxl" or reached("text_encoder_2.", ""))
    denoiser = "transformer" if "transformer" in dm else "unet"
    assert reached(denoiser, "attn.to_k" if denoiser == "transformer" else "attn2.to_k")
    # the denoiser's output layer sees no gradient: only the attention maps carry this loss
    assert not reached(denoiser, "proj_out" if denoiser == "transformer" else "conv_out")


def test_toy_sd21_regresses_v_and_the_others_their_own_targets():
    """A stand-in denoiser that returns the true v = alpha_t noise - sigma_t x_0 (read back from
    the noisy latent it is given, x_t = alpha_t x_0 + sigma_t noise) has zero loss under toy-sd21's
    v-prediction schedule, and a loss under an epsilon schedule, where the true noise is the
    target: the loss regresses what the schedule's prediction_type names."""
    from types import SimpleNamespace

    from diffusers import DDPMScheduler
    x0 = torch.randn(3, 4, 32, 32, generator=torch.Generator().manual_seed(1))
    config = toy_teachers.build("toy-sd21", None)["scheduler"].config
    schedule_v = DDPMScheduler.from_config(config)
    assert schedule_v.config.prediction_type == "v_prediction"
    a_bar = schedule_v.alphas_cumprod

    def true_v(noisy, t, **kwargs):
        alpha = a_bar[t].sqrt()[:, None, None, None]                   # (B, 1, 1, 1)
        sigma = (1 - a_bar[t]).sqrt()[:, None, None, None]
        noise = (noisy - alpha * x0) / sigma
        return SimpleNamespace(sample=alpha * noise - sigma * x0)
    dm = {"unet": true_v}
    loss = lambda schedule: toy_teachers.denoising_loss(  # noqa: E731
        dm, x0, None, {}, torch.Generator().manual_seed(0), schedule)
    schedule_eps = DDPMScheduler.from_config(schedule_v.config, prediction_type="epsilon")
    assert loss(schedule_v) < 1e-8 and loss(schedule_eps) > 0.1


def test_toy_teachers_keep_their_families_features():
    """The stand-ins keep their families' attention: SD3's joint blocks over 16x16 tokens, SD 2's
    linear, upcast blocks and "!"-padding gelu text encoder, SDXL's cross-attention at the inner
    two levels (16x16 and 8x8 of the 32x32 latent) only."""
    sd3 = toy_teachers.build("toy-sd3", None)["transformer"]
    assert sd3.config.sample_size // sd3.config.patch_size == 16
    assert all(type(b.attn).__name__ == "Attention" and b.attn.added_kv_proj_dim
               for b in sd3.transformer_blocks)
    sd21 = toy_teachers.build("toy-sd21", None)
    assert sd21["tokenizer"].pad_token == "!" and sd21["text_encoder"].config.hidden_act == "gelu"
    assert sd21["unet"].config.use_linear_projection and sd21["unet"].config.upcast_attention
    unet = toy_teachers.build("toy-sdxl", None)["unet"]
    attn = [name for name in unet.attn_processors if name.endswith("attn2.processor")]
    assert not any(name.startswith(("down_blocks.0", "up_blocks.2")) for name in attn)
    assert any(name.startswith("down_blocks.1") for name in attn)


def test_missing_toy_teacher_weights_fail_with_the_command_that_makes_them(tmp_path):
    with pytest.raises(SystemExit, match="toy.py train-sd --dm toy-sd3"):
        models.load_dm("toy-sd3", path=str(tmp_path / "absent"))
    with pytest.raises(SystemExit, match="--dm toy-sdxl: no diffusion model weights"):
        models.load_dm("toy-sdxl", path=str(tmp_path / "absent"))


@pytest.mark.parametrize("show", [True, False])
def test_the_base_loop_draws_no_bar_when_quiet_or_logged(show, capsys):
    """fit_base's bar follows data.progress_bar: drawn only on a terminal and without --quiet, so a
    logged or --quiet run's stderr holds no redraws; the loop itself runs every step either way."""
    weight = torch.nn.Parameter(torch.ones(3))
    losses = toy_teachers.fit_base([weight], lambda step: (weight ** 2).sum(), 3, 1e-2, "toy",
                                   show=show)
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert capsys.readouterr().err == ""
