"""Tests of extract.py and jpeg_maps.py: tiny SD built from configs (random, seeded), CLIP
tokenizer built in memory, CPU.

    python -m pytest -q tests/test_extract.py    # about a minute on 2 CPU cores, nothing downloaded
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data
import extract
import jpeg_maps
import models
import teachers
from conftest import write_dataset

ROOT = Path(__file__).resolve().parent.parent
# the grids still meet; the tests stay quick
FAST = dict(inversion_steps=2, denoise_steps=3)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and far faster than two when other jobs share the
    CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def dm():
    return models.load_dm("tiny-sd")


def pieces(dm, positions):
    """The CLIP pieces at 77-token positions (position 0 is the start token)."""
    ids = dm["tokenizer"](TEXT, padding="max_length", max_length=77, truncation=True).input_ids
    return [dm["tokenizer"].convert_ids_to_tokens(ids[p]) for p in positions]


TEXT = "A red circle? An elephant, red dog's RED"


# ---- words ----------------------------------------------------------------------------------

def test_words_worked_example(dm):
    words, positions = extract.text_words(dm["tokenizer"], TEXT)
    # punctuation ("?", ",") dropped; "red" three times -> one entry; case folded as CLIP does
    assert words == ["a", "red", "circle", "an", "elephant", "dog", "'s"]
    red = positions[words.index("red")]
    assert len(red) == 3 and all(len(occ) == 1 for occ in red)
    assert {pieces(dm, occ)[0] for occ in red} == {"red</w>"}
    # "elephant" is not in the tiny vocabulary: several consecutive pieces, one word
    (elephant,) = positions[words.index("elephant")]
    assert len(elephant) > 1 and elephant == list(range(elephant[0], elephant[0] + len(elephant)))
    assert "".join(pieces(dm, elephant)) == "elephant</w>"
    # positions count from 1: position 0 is CLIP's start token
    assert positions[0] == [[1]] and pieces(dm, [1]) == ["a</w>"]


def test_words_glue_digits_and_letters_that_clip_cuts_apart(dm):
    # CLIP's pre-tokenizer cuts numbers into digits and letters from digits; "don't" stays two words
    words, positions = extract.text_words(dm["tokenizer"], "25 dogs, mp3 don't")
    assert words == ["25", "dogs", "mp3", "don", "'t"]
    mp3 = positions[2][0]
    assert positions[0] == [[1, 2]] and mp3[-1] == mp3[0] + len(mp3) - 1


def test_words_truncated_beyond_clip_limit_with_warning(dm):
    # 74 + several + 1 tokens: "elephant" is cut
    text = " ".join(["red"] * 74 + ["elephant", "blue"])
    n = 74 + len(dm["tokenizer"]("elephant", add_special_tokens=False).input_ids) + 1
    with pytest.warns(UserWarning, match=f"item 'long-1'.*{n} CLIP tokens"):
        words, positions = extract.text_words(dm["tokenizer"], text, max_tokens=75,
                                              item_id="long-1")
    # the cut "elephant" and the lost "blue" get no map
    assert words == ["red"]
    assert len(positions[0]) == 74 and max(p for occ in positions[0] for p in occ) <= 75


def test_word_weights_average_pieces_then_occurrences():
    W = extract.word_weights([[[1], [3]], [[2, 4]], [[5]]], 6)
    expected = torch.tensor([[0, .5, 0, .5, 0, 0], [0, 0, .5, 0, .5, 0], [0, 0, 0, 0, 0, 1.]])
    assert torch.equal(W, expected)


# ---- capture --------------------------------------------------------------------------------

def test_capture_leaves_unet_output_unchanged_and_maps_are_distributions(dm):
    unet = dm["unet"]
    torch.manual_seed(1)
    x, ctx = torch.randn(2, 4, 16, 16), torch.randn(2, 77, 32)
    with torch.no_grad():
        plain = unet(x, 500, encoder_hidden_states=ctx).sample
        store = teachers.new_store((16, 16), columns=77)
        with extract.capturing(unet, store):
            kinds = {name: type(p).__name__ for name, p in unet.attn_processors.items()}
            captured = unet(x, 500, encoder_hidden_states=ctx).sample
    assert torch.allclose(plain, captured, atol=1e-5), (plain - captured).abs().max()
    # attn2 only: self-attention keeps SDPA; everything is restored afterwards
    assert all(k == ("CrossAttentionCapture" if n.endswith("attn2.processor")
                     else "AttnProcessor2_0") for n, k in kinds.items())
    assert all(type(p).__name__ == "AttnProcessor2_0" for p in unet.attn_processors.values())
    # 7 attn2 layers (16x16: down 1 + up 2; 8x8: down 1, mid 1, up 2); softmax over the 77
    # positions: each pixel's mean map sums to 1
    assert store["count"] == 7 and store["sum"].shape == (2, 77, 16, 16)
    assert torch.allclose((store["sum"] / store["count"]).sum(1), torch.ones(2, 16, 16), atol=1e-5)


def test_captured_probabilities_match_diffusers_own_attention_scores(dm):
    """eq. 13 against diffusers' reference path (Attention.get_attention_scores), one attn2
    module."""
    attn = dm["unet"].down_blocks[0].attentions[0].transformer_blocks[0].attn2
    x, ctx = torch.randn(2, 64, attn.to_q.in_features), torch.randn(2, 77, 32)   # an 8x8 grid
    store = teachers.new_store((8, 8), columns=77)
    with torch.no_grad():
        extract.CrossAttentionCapture(store)(attn, x, ctx)
        q, k = attn.head_to_batch_dim(attn.to_q(x)), attn.head_to_batch_dim(attn.to_k(ctx))
        ref = attn.get_attention_scores(q, k).view(2, attn.heads, 64, 77).mean(1)       # (B, N, T)
    assert torch.allclose(store["sum"], ref.transpose(1, 2).reshape(2, 77, 8, 8), atol=1e-6)


def test_layer_filter_keeps_only_chosen_resolutions(dm):
    with torch.no_grad():
        for factors, count in (({1}, 3), ({2}, 4), ({1, 2}, 7)):
            store = teachers.new_store((16, 16), columns=5, factors=factors)
            with extract.capturing(dm["unet"], store):
                dm["unet"](torch.randn(1, 4, 16, 16), 10,
                           encoder_hidden_states=torch.randn(1, 77, 32))
            assert store["count"] == count


@pytest.mark.parametrize("inversion,denoise", [(5, 10), (3, 7), (10, 10), (1, 4)])
def test_inversion_and_denoising_grids_meet(dm, inversion, denoise):
    inverse, forward = extract.ddim_grids(dm["scheduler"], inversion, denoise)
    assert len(inverse.timesteps) == inversion and len(forward.timesteps) == denoise
    # inversion ends where denoising starts
    assert inverse.timesteps[-1] == forward.timesteps[0] == 999
    assert list(inverse.timesteps) == sorted(inverse.timesteps)
    assert inverse.config.clip_sample is False


def low_noise_grids(dm, steps):
    """Inversion and denoising grids over the lowest fifth of the noise range (t <= 199), where
    DDIM inversion of a random UNet is near-exact: the lowest `steps` of trailing grids of
    5 * steps."""
    inverse, forward = extract.ddim_grids(dm["scheduler"], 5 * steps, 5 * steps)
    inverse.timesteps, forward.timesteps = inverse.timesteps[:steps], forward.timesteps[-steps:]
    return inverse, forward


def test_inversion_then_denoising_comes_back(dm):
    """With the same grid both ways, DDIM inversion is undone by DDIM denoising, better with more
    steps."""
    x0, ctx = torch.randn(1, 4, 16, 16), torch.randn(1, 77, 32)
    errors = []
    for steps in (2, 20):
        inverse, forward = low_noise_grids(dm, steps)
        with torch.no_grad():
            back = extract.invert_and_denoise(dm["unet"], x0, ctx, inverse, forward)
        errors.append(((back - x0).norm() / x0.norm()).item())
    assert errors[1] < errors[0] / 3 and errors[1] < 0.05, errors


# ---- end to end -----------------------------------------------------------------------------

def test_extract_writes_one_map_per_distinct_word(dm, tmp_path):
    items = data.read_items(write_dataset(tmp_path, n=6, with_attn=False))
    summary = extract.extract(items, dm, tmp_path / "out", batch_size=3, progress=False)
    assert (summary["done"], summary["skipped"], summary["failed"]) == (6, 0, 0)
    for item in items:
        maps, words, meta = data.load_maps(data.maps_path(tmp_path / "out", item["id"]))
        assert words == extract.text_words(dm["tokenizer"], item["answer"])[0]
        # the fixture's answers are plain words
        assert words == list(dict.fromkeys(item["answer"].split()))
        assert maps.shape == (len(words), 32, 32) and torch.isfinite(maps).all()
        # min-max per word
        assert maps.amin(dim=(1, 2)).eq(0).all() and maps.amax(dim=(1, 2)).eq(1).all()
        settings = (meta["dm"], meta["inversion_steps"], meta["denoise_steps"], meta["res"],
                    meta["text"])
        assert settings == ("tiny-sd", 5, 10, 32, item["answer"])
    assert not list((tmp_path / "out").glob(".*tmp"))  # no temp file left behind
    # batch composition does not change an item's maps (batch 3 above vs batch 1 here)
    extract.extract(items[4:5], dm, tmp_path / "one", progress=False)
    a = data.load_maps(data.maps_path(tmp_path / "out", "item004"))[0]
    b = data.load_maps(data.maps_path(tmp_path / "one", "item004"))[0]
    assert torch.allclose(a, b, atol=2e-3)  # float16 storage


def test_resume_skips_complete_files_and_redoes_broken_ones(dm, tmp_path):
    items = data.read_items(write_dataset(tmp_path, n=5, with_attn=False))
    out = tmp_path / "out"
    first = extract.extract(items[:2], dm, out, progress=False, **FAST)
    assert first["done"] == 2
    before = data.maps_path(out, "item000").stat().st_mtime_ns
    # what a kill could leave if writes were not atomic
    data.maps_path(out, "item001").write_bytes(b"half a file")
    second = extract.extract(items, dm, out, progress=False, **FAST)
    assert (second["done"], second["skipped"], second["failed"]) == (4, 1, 0)
    assert data.maps_path(out, "item000").stat().st_mtime_ns == before
    assert all(data.is_complete(data.maps_path(out, item["id"])) for item in items)


def test_bad_items_land_in_failures_and_the_rest_completes(dm, tmp_path):
    path = write_dataset(tmp_path, n=3, with_attn=False)
    (tmp_path / "images" / "item001.png").write_bytes(b"\x89PNG not really")       # corrupt
    lines = [json.loads(line) for line in open(path)]
    lines[2]["answer"] = "   "                                                        # empty answer
    # no word, missing, bad id, duplicate, good
    lines += [dict(lines[0], id="punct", answer="?!"),
              dict(lines[0], id="gone", image="images/nope.png"),
              dict(lines[0], id="bad/id"), dict(lines[0]), dict(lines[0], id="fine")]
    Path(path).write_text("".join(json.dumps(line) + "\n" for line in lines))
    summary = extract.extract(data.read_items(path), dm, tmp_path / "out", batch_size=2,
                              progress=False, **FAST)
    # item000 and "fine" complete
    assert (summary["done"], summary["failed"]) == (2, 6)
    lines_out = map(json.loads, open(tmp_path / "out" / "failures.jsonl"))
    failures = {f["id"]: f["reason"] for f in lines_out}
    assert failures["item001"].startswith("corrupt image")
    assert failures["item002"].startswith("empty answer")
    assert failures["punct"].startswith("no mappable word")
    assert failures["gone"].startswith("missing image")
    assert failures["bad/id"].startswith("bad id")
    assert "duplicate id" in open(tmp_path / "out" / "failures.jsonl").read()
    assert data.is_complete(data.maps_path(tmp_path / "out", "item000"))


def test_duplicate_ids_are_caught_across_ranks_and_runs_are_named(dm, tmp_path, monkeypatch):
    path = write_dataset(tmp_path, n=2, with_attn=False)
    lines = [json.loads(line) for line in open(path)]
    # items 0 and 1 share an id: rank 0 gets item 0, rank 1 item 1
    lines[1]["id"] = lines[0]["id"]
    Path(path).write_text("".join(json.dumps(line) + "\n" for line in lines))
    items, out = data.read_items(path), tmp_path / "out"
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "run-a")
    shares = [extract.extract(items, dm, out, rank=r, world_size=2, progress=False, **FAST)
              for r in (0, 1)]
    assert [(s["done"], s["failed"]) for s in shares] == [(1, 0), (0, 1)]
    maps, words, meta = data.load_maps(data.maps_path(out, "item000"))
    # the first item's maps, not overwritten by its twin's
    assert meta["text"] == lines[0]["answer"]
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "run-b")
    # a re-run appends, named
    extract.extract(items, dm, out, rank=1, world_size=2, progress=False, **FAST)
    failures = [json.loads(line) for line in open(out / "failures.jsonl")]
    named = [(f["id"], f["rank"], f["run"]) for f in failures]
    assert named == [("item000", 1, "run-a"), ("item000", 1, "run-b")]
    assert failures[0]["reason"].startswith("duplicate id 'item000': item 1 repeats the id of "
                                            "item 0")


def test_two_ranks_equal_one_rank(dm, tmp_path):
    items = data.read_items(write_dataset(tmp_path, n=5, with_attn=False))
    one, two, run = tmp_path / "one", tmp_path / "two", tmp_path / "torchrun"
    extract.extract(items, dm, one, progress=False, **FAST)
    shares = [extract.extract(items, dm, two, rank=r, world_size=2, progress=False, **FAST)
              for r in (0, 1)]
    assert [s["done"] for s in shares] == [3, 2]  # items 0, 2, 4 and 1, 3
    # and through torchrun itself: two processes, each building tiny-sd from the same seed
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node", "2"]
    args = ["--dm", "tiny-sd", "--data", str(tmp_path / "data.jsonl"), "--out", str(run),
            "--inversion-steps", "2", "--denoise-steps", "3", "--batch-size", "2"]
    proc = subprocess.run(torchrun + [str(ROOT / "extract.py")] + args, cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "extract rank 0/2: 3 done" in proc.stdout and "extract rank 1/2: 2 done" in proc.stdout
    names = sorted(p.name for p in one.glob("*.safetensors"))
    assert len(names) == 5
    for other in (two, run):
        assert sorted(p.name for p in other.glob("*.safetensors")) == names
        for name in names:
            a, wa, _ = data.load_maps(one / name)
            b, wb, _ = data.load_maps(other / name)
            assert wa == wb and torch.allclose(a, b, atol=2e-3)


def test_bfloat16_unet_accumulates_in_float32(tmp_path):
    items = data.read_items(write_dataset(tmp_path, n=1, with_attn=False))
    ref = extract.extract(items, models.load_dm("tiny-sd"), tmp_path / "f32", progress=False,
                          **FAST)
    bf16 = models.load_dm("tiny-sd", dtype=torch.bfloat16)
    low = extract.extract(items, bf16, tmp_path / "bf16", progress=False, **FAST)
    assert ref["done"] == low["done"] == 1
    a = data.load_maps(data.maps_path(tmp_path / "f32", "item000"))[0]
    b = data.load_maps(data.maps_path(tmp_path / "bf16", "item000"))[0]
    assert torch.isfinite(b).all()
    assert np.corrcoef(a.flatten().numpy(), b.flatten().numpy())[0, 1] > 0.9


# ---- presets --------------------------------------------------------------------------------

def test_folder_preset_loads_through_the_same_path(dm, tmp_path):
    from diffusers import DDIMScheduler, PNDMScheduler
    models.save_dm(models.tiny_sd(), tmp_path / "toy-sd")
    # sd14 ships a PNDM scheduler config: load_dm must make a DDIM scheduler of the same schedule
    # from it
    pndm = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1)
    pndm.save_pretrained(tmp_path / "toy-sd" / "scheduler")
    loaded = models.load_dm("toy-sd", path=tmp_path / "toy-sd")
    assert type(loaded["scheduler"]) is DDIMScheduler
    assert torch.equal(loaded["scheduler"].alphas_cumprod, dm["scheduler"].alphas_cumprod)
    assert loaded["res"] == dm["res"] == 32 and loaded["name"] == "toy-sd"
    x, ctx = torch.randn(1, 4, 16, 16), torch.randn(1, 77, 32)
    with torch.no_grad():
        assert torch.allclose(loaded["unet"](x, 3, encoder_hidden_states=ctx).sample,
                              dm["unet"](x, 3, encoder_hidden_states=ctx).sample, atol=1e-6)
    loaded_words = extract.text_words(loaded["tokenizer"], TEXT)
    assert loaded_words == extract.text_words(dm["tokenizer"], TEXT)


def test_missing_weights_give_one_clear_error(tmp_path):
    with pytest.raises(SystemExit, match=r"--dm toy-sd: no diffusion model weights .*--dm-path"):
        models.load_dm("toy-sd", path=tmp_path / "nothing-here")


# ---- the authors' layout --------------------------------------------------------------------

def release_reader(root, image_name):
    """The authors' training-time reader of their published maps (load_sd_attn in the release's
    diffag/diffag_utils.py), written here from what it does, not copied: every attention_<word>.jpg
    in any subfolder of <root>/<image file name>/lpm_attention/, the word cut out of the file name
    at "_" and ".", pixels / 255."""
    maps = {}
    for sub in sorted((Path(root) / image_name / "lpm_attention").iterdir()):
        for jpg in sorted(sub.glob("attention_*.jpg")):
            word = jpg.name.split("_")[1].split(".")[0]
            pixels = np.asarray(Image.open(jpg).convert("L"), dtype=np.float32)
            maps[word] = torch.from_numpy(pixels / 255)
    return maps


def test_authors_jpeg_layout_round_trip(tiny_dataset, tmp_path):
    items = data.read_items(tiny_dataset)
    attn = Path(tiny_dataset).parent / "attn"
    # 14 maps in all
    n_maps = sum(len(data.load_maps(data.maps_path(attn, it["id"]))[1]) for it in items)
    assert jpeg_maps.export_jpeg(items, attn, tmp_path / "jpeg") == (6, n_maps)
    folder = tmp_path / "jpeg" / "item004.png" / "lpm_attention" / "item004"
    jpg = folder / "attention_circle.jpg"
    with Image.open(jpg) as img:
        assert (img.mode, img.size) == ("L", (32, 32))
    # the release's reader finds our maps, by word
    ours, words, _ = data.load_maps(data.maps_path(attn, "item004"))
    theirs = release_reader(tmp_path / "jpeg", "item004.png")
    assert sorted(theirs) == sorted(words)
    assert all((theirs[w] - m).abs().mean() < 0.05 for w, m in zip(words, ours))
    back = jpeg_maps.import_jpeg(items, tmp_path / "jpeg", tmp_path / "back")
    assert back == (6, n_maps, n_maps)
    for item in items:
        a, wa, _ = data.load_maps(data.maps_path(attn, item["id"]))
        b, wb, _ = data.load_maps(data.maps_path(tmp_path / "back", item["id"]))
        assert wa == wb  # text order survives the trip
        # 8-bit JPEG of random maps: a small, bounded error
        assert (a - b).abs().mean() < 0.05


def test_authors_layout_is_per_image(tiny_dataset, tmp_path):
    """Two items on one image share its folder: the second's new words join it, a word the first
    already wrote keeps the first's map (with a warning), and each item imports its own words."""
    items = data.read_items(tiny_dataset)[:2]
    items[1] = dict(items[1], image=items[0]["image"], image_path=items[0]["image_path"])
    attn = Path(tiny_dataset).parent / "attn"
    with pytest.warns(UserWarning, match="already has a map"):
        n_items, n_maps = jpeg_maps.export_jpeg(items, attn, tmp_path / "jpeg")
    words = [data.load_maps(data.maps_path(attn, it["id"]))[1] for it in items]
    assert n_items == 2 and n_maps == len(set(words[0]) | set(words[1]))
    assert jpeg_maps.import_jpeg(items, tmp_path / "jpeg", tmp_path / "back")[0] == 2
    back = [data.load_maps(data.maps_path(tmp_path / "back", it["id"]))[1] for it in items]
    assert back == words
