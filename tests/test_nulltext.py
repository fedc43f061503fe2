"""Tests of nulltext.py and `extract.py --inversion null-text`: tiny SD from configs, random, CPU.

    python -m pytest -q tests/test_nulltext.py        # seconds on one thread, nothing downloaded
"""
import pytest
import torch
from safetensors import safe_open

import data
import extract
import models
import nulltext
import teachers
from conftest import write_dataset

TEXTS = ["a red circle", "blue square left of a circle"]


@pytest.fixture(scope="module")
def dm():
    return models.load_dm("tiny-sd")


def setting(dm, steps=5, seed=0):
    """(x0, text context, empty-prompt context, pivot, forward): two random 16x16 latents, their
    texts, and the DDIM-inverted trajectory on one trailing grid of `steps`."""
    torch.manual_seed(seed)
    x0 = torch.randn(2, 4, 16, 16)                                              # z*_0
    ids = dm["tokenizer"](TEXTS, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        context = dm["text_encoder"](ids)[0]                                    # (2, 77, 32)
    inverse, forward = extract.ddim_grids(dm["scheduler"], steps, steps)
    pivot = nulltext.ddim_pivot(dm["unet"], x0, context, inverse)
    return x0, context, nulltext.empty_prompt(dm, 2), pivot, forward


def mse(a, b):  # per item
    return (a - b).pow(2).mean(dim=(1, 2, 3))                                   # (B,)


# ---- the method --------------------------------------------------------------------------------

def test_pivot_and_denoising_share_one_grid(dm):
    """Step i of the denoising starts at the pivot's level t and aims at the level below it."""
    x0, _, _, pivot, forward = setting(dm)
    inverse, _ = extract.ddim_grids(dm["scheduler"], 5, 5)
    assert len(pivot) == 6 and pivot[0] is x0
    assert list(forward.timesteps) == list(inverse.timesteps)[::-1] == [999, 799, 599, 399, 199]
    assert forward.final_alpha_cumprod == inverse.initial_alpha_cumprod  # z_0 is z*_0's level


def test_null_text_reconstructs_better_than_the_empty_prompt_at_guidance_7_5(dm):
    """Guided denoising (w = 7.5) from the inverted latent: with the tuned null embeddings the
    latent comes back closer to z*_0 than with the empty prompt's (the baseline of Mokady et al.
    Fig. 4). With 0 iterations the two are the same computation, so the margin is the tuning's."""
    x0, context, null, pivot, forward = setting(dm)
    unet, w = dm["unet"], 7.5
    plain = nulltext.guided_denoise(unet, pivot[-1], context, [null] * 5, forward, w)
    nulls, z = nulltext.null_text_inversion(unet, pivot, context, null, forward, w, iters=10)
    again = nulltext.guided_denoise(unet, pivot[-1], context, nulls, forward, w)
    untuned, z0 = nulltext.null_text_inversion(unet, pivot, context, null, forward, w, iters=0)
    assert torch.equal(z0, plain) and all(torch.equal(n, null) for n in untuned)
    # the tuned embeddings replayed give the optimisation's latent
    assert torch.equal(again, z)
    # measured: 8.75 vs 14.06 and 17.57 vs 36.95 (a random UNet's inversion is far from exact)
    assert (mse(z, x0) < 0.75 * mse(plain, x0)).all(), (mse(z, x0), mse(plain, x0))


def test_guidance_1_leaves_the_null_embedding_untouched(dm):
    """At w = 1 the guided step is the conditional one: ∅ has no gradient, Adam does not move it."""
    _, context, null, pivot, forward = setting(dm, steps=2)
    nulls, _ = nulltext.null_text_inversion(dm["unet"], pivot, context, null, forward, 1.0, iters=3)
    assert all(torch.equal(n, null) for n in nulls)


def test_each_item_is_tuned_on_its_own(dm):
    """One Adam state and one stopping test per item: an item's ∅_t is the same in a batch of two
    as alone (up to batched float arithmetic)."""
    _, context, null, pivot, forward = setting(dm, steps=2)
    both, _ = nulltext.null_text_inversion(dm["unet"], pivot, context, null, forward, 7.5, iters=3)
    alone, _ = nulltext.null_text_inversion(dm["unet"], [p[1:] for p in pivot], context[1:],
                                            null[1:], forward, 7.5, iters=3)
    for a, b in zip(both, alone):
        torch.testing.assert_close(a[1:], b, atol=2e-3, rtol=0)


def test_maps_captured_while_tuning_equal_a_second_guided_pass(dm):
    """The capture rides on the optimisation's conditional UNet calls: the same maps as a separate
    guided denoising with the tuned ∅_t, and no map from the unconditional branch."""
    _, context, null, pivot, forward = setting(dm, steps=3)
    unet, stores = dm["unet"], [teachers.new_store((16, 16), 9) for _ in range(2)]
    with extract.capturing(unet, stores[0]):
        nulls, _ = nulltext.null_text_inversion(unet, pivot, context, null, forward, 7.5, 2,
                                                stores[0])
    with extract.capturing(unet, stores[1]):
        nulltext.guided_denoise(unet, pivot[-1], context, nulls, forward, 7.5, stores[1])
    # 3 steps x 7 attn2 layers, cond only
    assert stores[0]["count"] == stores[1]["count"] == 3 * 7
    torch.testing.assert_close(stores[0]["sum"], stores[1]["sum"], atol=1e-5, rtol=1e-5)


# ---- extraction: the store, and ddim unchanged ---------------------------------------------------

def test_null_text_store_has_the_same_format_and_records_its_settings(dm, tmp_path):
    items = data.read_items(write_dataset(tmp_path, n=3, with_attn=False))
    summary = extract.extract(items, dm, tmp_path / "nt", inversion_steps=2, batch_size=2,
                              progress=False, inversion="null-text", null_text_iters=3)
    ddim = extract.extract(items, dm, tmp_path / "ddim", inversion_steps=2, denoise_steps=2,
                           batch_size=2, progress=False)
    assert summary["done"] == ddim["done"] == 3
    for item in items:
        maps, words, meta = data.load_maps(data.maps_path(tmp_path / "nt", item["id"]))
        assert words == extract.text_words(dm["tokenizer"], item["answer"])[0]
        assert maps.shape == (len(words), 32, 32) and torch.isfinite(maps).all()
        assert maps.amin(dim=(1, 2)).eq(0).all() and maps.amax(dim=(1, 2)).eq(1).all()
        keys = ("inversion", "guidance", "null_text_iters", "inversion_steps", "denoise_steps")
        assert [meta[k] for k in keys] == ["null-text", "7.5", 3, 2, 2]
        assert meta["text"] == item["answer"]
        plain, _, plain_meta = data.load_maps(data.maps_path(tmp_path / "ddim", item["id"]))
        assert "inversion" not in plain_meta and set(plain_meta) < set(meta)  # keys added only
        # w = 7.5 and the tuned null change the maps
        assert not torch.equal(maps, plain)


def stored(path):
    """(float16 maps as written, metadata strings) of a store file."""
    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor("maps"), f.metadata()


def test_ddim_store_is_bit_for_bit_what_its_functions_write(dm, tmp_path):
    """--inversion ddim (the default): the stored float16 maps are bit for bit those of
    dm_attention -> word_maps -> save_maps, with a ddim store's metadata (no "inversion" key).
    (The files' bytes are not compared: safetensors writes the metadata in hash order, which
    differs from one write of the same store to the next.)"""
    items = data.read_items(write_dataset(tmp_path, n=2, with_attn=False))
    extract.extract(items, dm, tmp_path / "out", inversion_steps=2, denoise_steps=3, progress=False)
    for item in items:
        words, positions = extract.text_words(dm["tokenizer"], item["answer"])
        columns = extract.context_columns([positions])
        image = data.load_image(item["image_path"], dm["res"])[None]
        attention = extract.dm_attention(dm, image, [item["answer"]], columns, 2, 3)
        meta = {"dm": "tiny-sd", "inversion_steps": 2, "denoise_steps": 3, "res": 32,
                "capture_steps": "denoise", "layers": "all", "text": item["answer"]}
        path = tmp_path / "expected" / f"{item['id']}.safetensors"
        maps = extract.word_maps(attention[0], extract.word_weights(positions, columns))
        data.save_maps(path, maps, words, meta)
        got, got_meta = stored(data.maps_path(tmp_path / "out", item["id"]))
        want, want_meta = stored(path)
        assert got.dtype == torch.float16 and torch.equal(got, want) and got_meta == want_meta


# ---- arguments ---------------------------------------------------------------------------------

@pytest.mark.parametrize("flags,message", [
    (["--inversion", "null-text", "--denoise-steps", "10"], r"--denoise-steps 10 with --inversion"),
    (["--inversion", "null-text", "--guidance", "1"], r"--guidance 1.0: .*above 1"),
    (["--inversion", "null-text", "--guidance", "nan"], r"--guidance nan"),
    (["--inversion", "null-text", "--null-text-iters", "-1"], r"--null-text-iters -1: .*>= 0"),
    (["--guidance", "3"], r"--guidance 3.0: only --inversion null-text uses it"),
    (["--null-text-iters", "5"], r"--null-text-iters 5: only --inversion null-text uses it"),
])
def test_bad_inversion_flags_stop_before_any_work(tmp_path, monkeypatch, flags, message):
    """The command line stops with the flag and its value before the DM is loaded or --out made."""
    path = write_dataset(tmp_path, n=1, with_attn=False)
    monkeypatch.setattr(extract, "load_dm", lambda *a, **k: pytest.fail("the DM was loaded"))
    with pytest.raises(SystemExit, match=message):
        extract.main(["--dm", "tiny-sd", "--data", path, "--out", str(tmp_path / "out"), *flags])
    assert not (tmp_path / "out").exists()


def test_bad_inversion_name_and_function_arguments_are_refused(dm, tmp_path, capsys):
    with pytest.raises(SystemExit):
        extract.main(["--data", "x.jsonl", "--inversion", "null_text"])
    assert "--inversion: invalid choice: 'null_text'" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"--inversion 'nulltext': give one of ddim, null-text"):
        extract.extract([], dm, tmp_path / "out", inversion="nulltext")
    with pytest.raises(ValueError, match=r"--denoise-steps 10 with --inversion null-text"):
        extract.extract([], dm, tmp_path / "out", denoise_steps=10, inversion="null-text")
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="null-text inversion denoises on the inversion's own"):
        extract.dm_attention(dm, torch.zeros(1, 3, 32, 32), ["red"], 2, 5, 10,
                             inversion="null-text")
