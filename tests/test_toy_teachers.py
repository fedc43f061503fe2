"""Tests of toy_teachers.py: the SDXL-style and SD3-style toy teachers train on the miniature
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

NAMES = ("toy-sdxl", "toy-sd3")


@pytest.mark.parametrize("name", NAMES)
def test_toy_teacher_trains_saves_loads_and_writes_the_store(name, small_world, tmp_path):
    root, paths = small_world
    out = toy_teachers.train(name, tmp_path / name, root, seed=3, steps=2, batch=4)
    summary = json.loads((out / "training.json").read_text())
    assert (summary["name"], summary["steps"]) == (name, 2)
    # loss = denoising + LOCALISE x localisation, whose three region means of attention shares
    # lie in [0, 1]: the localisation term lies in [-1, 2]
    local = (summary["final_loss"] - summary["final_denoise"]) / summary["localise"]
    assert math.isfinite(summary["final_loss"]) and -1.001 <= local <= 2.001
    dm = models.load_dm(name, path=str(out))
    assert dm["res"] == world.SIZE and ("text_encoder_2" in dm) == (name == "toy-sdxl")
    items = [it for it in data.read_items(paths["test-id"]) if it.get("masks")][:2]
    layers = models.PRESETS[name]["layers"]
    settings = extract_and_check_store(dm, items, tmp_path / "attn", inversion_steps=2,
                                       denoise_steps=2, layers=layers)
    assert [meta["layers"] for meta in settings] == ["2" if layers else "all"] * 2


@pytest.mark.parametrize("name", NAMES)
def test_one_step_trains_the_denoiser_and_every_text_encoder(name, small_world):
    """Both losses reach every part: the denoiser and each text encoder change in one step (for
    SDXL the second encoder feeds the context and the pooled "text_time" vector)."""
    root, paths = small_world
    vae = models.load_dm_folder(toy_teachers.models.ROOT / "toy_models" / "toy-sd")["vae"]
    dm = dict(toy_teachers.build(name, vae.eval().requires_grad_(False)), name=name)
    parts = [p for p in ("unet", "transformer", "text_encoder", "text_encoder_2") if p in dm]
    before = {p: [w.detach().clone() for w in dm[p].parameters()] for p in parts}
    scenes = [it["objects"] for it in data.read_items(paths["pretrain"])][:4]
    latents = torch.randn(4, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    log, denoise = toy_teachers.fit(dm, latents, scenes, steps=1, batch=4, lr=1e-3, seed=0)
    assert len(log) == len(denoise) == 1
    for p in parts:
        moved = sum(int(not torch.equal(a, b)) for a, b in zip(before[p], dm[p].parameters()))
        assert moved > 0, f"{name}: no weight of {p} changed"


def test_toy_sd3_has_joint_attention_and_toy_sdxl_none_at_the_outer_level():
    """The stand-ins keep their families' attention: SD3's joint blocks over 16x16 tokens, SDXL's
    cross-attention at the inner two levels (16x16 and 8x8 of the 32x32 latent) only."""
    sd3 = toy_teachers.build("toy-sd3", None)["transformer"]
    assert sd3.config.sample_size // sd3.config.patch_size == 16
    assert all(type(b.attn).__name__ == "Attention" and b.attn.added_kv_proj_dim
               for b in sd3.transformer_blocks)
    unet = toy_teachers.build("toy-sdxl", None)["unet"]
    attn = [name for name in unet.attn_processors if name.endswith("attn2.processor")]
    assert not any(name.startswith(("down_blocks.0", "up_blocks.2")) for name in attn)
    assert any(name.startswith("down_blocks.1") for name in attn)


def test_missing_toy_teacher_weights_fail_with_the_command_that_makes_them(tmp_path):
    with pytest.raises(SystemExit, match="toy.py train-sd --dm toy-sd3"):
        models.load_dm("toy-sd3", path=str(tmp_path / "absent"))
    with pytest.raises(SystemExit, match="--dm toy-sdxl: no diffusion model weights"):
        models.load_dm("toy-sdxl", path=str(tmp_path / "absent"))
