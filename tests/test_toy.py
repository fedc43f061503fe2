"""Tests of toy.py: the miniature world, the shipped toy-sd and toy VLM, the demo end to end.

CPU only, nothing downloaded; the shipped weights in toy_models/ are read as they are.
Run: python -m pytest -q tests/test_toy.py
"""
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import base_models
import data
import extract
import models
import toy
import world

SHIPPED_SD = toy.TOY_MODELS / "toy-sd"
SHIPPED_VLM = toy.TOY_MODELS / "toy-vlm"
# Set below what was measured on many held-out items (toy_report.md), since the tests use a dozen:
POINTING_THRESHOLD = 0.6      # toy-sd caption words: 84.5% measured on 750 held-out words; chance ~ 6%
COLOUR_POINTING_THRESHOLD = 0.8   # its colour words alone: 91% of 375
SHAPE_POINTING_THRESHOLD = 0.4    # its shape words alone: 78% of 375
VQA_THRESHOLD = 0.5           # toy VLM, one-object colour/shape questions: 67% measured on 496 items


@pytest.fixture(scope="module")
def small_world(tmp_path_factory, monkeypatch_module):
    """A world with small splits (the same generator, fewer images), drawn once for the module."""
    monkeypatch_module.setattr(world, "SPLITS", {k: (max(8, v[0] // 100), *v[1:]) for k, v in world.SPLITS.items()})
    out = tmp_path_factory.mktemp("world")
    return out, world.build_world(out, seed=3)


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def digest(folder):
    """sha256 over every file of a folder (names and bytes), sorted."""
    h = hashlib.sha256()
    for p in sorted(Path(folder).rglob("*")):
        if p.is_file() and p.name != "world.json":
            h.update(str(p.relative_to(folder)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def read(path):
    return [json.loads(line) for line in open(path)]


# ---------------------------------------------------------------------------------------------
# the world
# ---------------------------------------------------------------------------------------------

def test_world_is_deterministic_by_seed(small_world, tmp_path):
    out, _ = small_world
    again = tmp_path / "again"
    other = tmp_path / "other"
    world.build_world(again, seed=3)
    world.build_world(other, seed=4)
    assert digest(again) == digest(out)
    assert digest(other) != digest(out)


def test_a_larger_finetune_split_extends_the_smaller_one(small_world, tmp_path):
    """--finetune-items draws more fine-tuning images from the same stream: the smaller split's items
    come first, unchanged; the other splits and their files are untouched; the stamp tells them apart."""
    out, paths = small_world
    bigger = world.build_world(tmp_path / "big", seed=3, finetune_items=12)
    small, big = read(paths["finetune"]), read(bigger["finetune"])
    assert len(small) == 8 and len(big) == 12 and big[:8] == small
    for split in ("pretrain", "test-id", "test-ood", "test-captions"):
        assert read(bigger[split]) == read(paths[split])
    assert json.loads((tmp_path / "big" / "world.json").read_text())["splits"]["finetune"][0] == "12"
    assert (tmp_path / "big" / "world.json").read_text() != (out / "world.json").read_text()


def test_masks_match_drawings(small_world):
    """Every mask is exactly the pixels of its object's colour (objects never overlap), and the
    word a mask is filed under names that object's colour or shape."""
    out, paths = small_world
    checked = 0
    for split in ("finetune", "test-id", "test-ood", "test-captions"):
        for item in read(paths[split]):
            pixels = np.asarray(Image.open(out / item["image"]).convert("RGB"))    # (32, 32, 3)
            for word, rel in item.get("masks", {}).items():
                mask = np.asarray(Image.open(out / rel)) > 127                     # (32, 32)
                k = int(Path(rel).stem.rsplit("-", 1)[1])
                obj = item["objects"][k]
                assert word in (obj["colour"], obj["shape"]), (item["id"], word, obj)
                coloured = (pixels == world.COLOURS[obj["colour"]]).all(-1)          # (32, 32)
                assert mask.sum() >= 20 and np.array_equal(mask, coloured), (item["id"], word)
                assert np.array_equal(mask, world.shape_mask(obj["shape"], obj["cx"], obj["cy"], obj["r"]))
                checked += 1
    assert checked > 30


def test_answers_are_true_of_the_scene(small_world):
    out, paths = small_world
    for split in ("pretrain", "finetune", "test-id", "test-ood"):
        for item in read(paths[split]):
            objs, q, a = item["objects"], item["question"], item["answer"]
            pairs = {(o["colour"], o["shape"]) for o in objs}
            if item["category"] == "colour":
                assert (a, q.split()[-1].rstrip("?")) in pairs
            elif item["category"] == "shape":
                assert (q.split()[-2], a) in pairs
            elif item["category"] == "count":
                assert a == world.COUNT_WORDS[len(objs)]
            elif item["category"] == "yesno":
                c, s = q.rstrip("?").split()[-2:]
                assert a == ("yes" if (c, s) in pairs else "no")
            assert len({o["colour"] for o in objs}) == len(objs) == len({o["shape"] for o in objs})


def test_splits_follow_the_design(small_world):
    """pretrain asks binding questions only of one-object scenes; fine-tuning never shows a held-out
    colour-shape pair; every test-ood colour/shape question is about a held-out pair."""
    _, paths = small_world
    for item in read(paths["pretrain"]):
        if item["category"] in ("colour", "shape", "yesno", "position", "caption"):
            assert len(item["objects"]) == 1
    held = {tuple(p) for p in world.HELD_OUT}
    for item in read(paths["finetune"]):
        assert not {(o["colour"], o["shape"]) for o in item["objects"]} & held
        assert len(item["objects"]) >= 2
    for item in read(paths["test-ood"]):
        if item["category"] in ("colour", "shape"):
            k = int(Path(item["masks"][item["answer"]]).stem.rsplit("-", 1)[1])
            o = item["objects"][k]
            assert (o["colour"], o["shape"]) in held


def test_world_reads_through_the_project(small_world):
    """The JSONL is the DESIGN.md format: data.read_items and data.collate take it unchanged."""
    _, paths = small_world
    items = data.read_items(paths["finetune"])
    assert all(Path(it["image_path"]).exists() for it in items)
    model, processor = base_models.toy_vlm(seed=0)
    batch = data.collate(processor, items[:3])
    assert batch["pixel_values"].shape == (3, 1, 1, 3, 32, 32)
    # every world word is one token of each tokenizer
    clip = base_models.toy_sd_tokenizer()
    for word in world.world_words():
        assert len(clip.tokenize(word)) == 1
        assert len(processor.tokenizer.tokenize(" " + word)) == 1


def test_clip_tokenizer_worked_example():
    tok = base_models.toy_sd_tokenizer()
    pieces = tok.convert_ids_to_tokens(tok("a red circle, left of a blue square? redd").input_ids)
    assert pieces == ["<|startoftext|>", "a</w>", "red</w>", "circle</w>", ",</w>", "left</w>", "of</w>", "a</w>",
                      "blue</w>", "square</w>", "?</w>", "re", "d", "d</w>", "<|endoftext|>"]


# ---------------------------------------------------------------------------------------------
# the shipped models
# ---------------------------------------------------------------------------------------------

def test_shipped_toy_sd_points_at_objects(small_world, tmp_path):
    """Held-out captions: the argmax of a colour/shape word's map (extract.py, the sd14 path) falls
    inside the word's object. Measured on 150 held-out images: see toy_report.md; chance ~ 6%."""
    _, paths = small_world
    dm = models.load_dm("toy-sd", path=SHIPPED_SD)
    assert dm["res"] == 32 and dm["vae"] is not None
    items = data.read_items(paths["test-captions"])[:12]
    summary = extract.extract(items, dm, tmp_path / "attn", inversion_steps=5, denoise_steps=5, batch_size=12,
                              progress=False)
    assert summary["done"] == len(items)
    result = base_models.dm_pointing(items, tmp_path / "attn")
    assert result["n"] >= 40
    assert result["accuracy"] >= POINTING_THRESHOLD, result
    assert result["colour"] >= COLOUR_POINTING_THRESHOLD and result["shape"] >= SHAPE_POINTING_THRESHOLD, result


def test_shipped_toy_vlm_loads_through_train_and_answers(small_world):
    _, paths = small_world
    model, processor = models.load_vlm("toy", str(SHIPPED_VLM))
    assert processor.tokenizer.convert_tokens_to_ids("<|image|>") == model.config.image_token_index
    items = [it for it in data.read_items(paths["pretrain"]) if it["category"] in ("colour", "shape")][:20]
    assert base_models.exact_accuracy(model, processor, items) >= VQA_THRESHOLD   # one-object scenes: the pre-training task


# ---------------------------------------------------------------------------------------------
# the demo, end to end in seconds: the real extract.py, train.py and evaluate.py on a few items
# ---------------------------------------------------------------------------------------------

def test_quick_demo_end_to_end(small_world, tmp_path):
    """The demo with its default report, <out>/toy_report.md: the shipped one stays untouched."""
    world, _ = small_world
    shipped = (toy.ROOT / "toy_report.md").read_bytes()
    rows = toy.main(["--world", str(world), "--out", str(tmp_path / "demo"), "--seeds", "0", "--steps", "2",
                     "--batch-size", "4", "--limit", "8", "--inversion-steps", "2", "--denoise-steps", "1",
                     "--quiet"])
    table = dict((r[0], r[1:]) for r in rows)
    for split in ("test-id", "test-ood"):
        for value in table[f"accuracy {split}"]:                     # base, AR, Lavender: all measured
            assert 0.0 <= float(value.split(" ± ")[0]) <= 1.0
    entropy, pointing = table["DM maps of the same words: entropy, pointing (test-id)"][0].split(", ")
    assert 0.0 < float(entropy) <= 6.932 and 0.0 <= float(pointing) <= 1.0
    for value in table["VLM's own attention: pointing (test-id)"]:  # one ruler: base, AR and Lavender
        assert 0.0 <= float(value.split(" ± ")[0]) <= 1.0
    assert table["Aligner head: pointing (test-id)"][:2] == ("", "")  # a head is Lavender's alone
    assert 0.0 <= float(table["Aligner head: pointing (test-id)"][2].split(" ± ")[0]) <= 1.0
    for loss in ("ar", "lavender"):
        config = json.loads((tmp_path / "demo" / "runs" / f"{loss}-s0" / "config.json").read_text())
        assert config["loss"] == loss and config["max_steps"] == 2 and config["model"] == "toy"
    lavender_log = [json.loads(l) for l in open(tmp_path / "demo" / "runs" / "lavender-s0" / "log.jsonl")]
    assert any(entry["aligned_words"] > 0 for entry in lavender_log)   # the DM maps reached the loss
    report = (tmp_path / "demo" / "toy_report.md").read_text()
    assert "| accuracy test-id |" in report and "toy_report/" in report
    assert any((tmp_path / "demo" / "toy_report").glob("test-id-*.png"))  # its pictures beside it
    assert (toy.ROOT / "toy_report.md").read_bytes() == shipped


def test_demo_dm_categories_limits_the_fine_tuning_maps(small_world, tmp_path):
    """--dm-categories colour: DM maps only for colour answers in fine-tuning (shape items then train
    with L_VLM alone); the test splits keep every map, so pointing and MSE are measured on every category."""
    world, _ = small_world
    toy.main(["--world", str(world), "--out", str(tmp_path / "demo"), "--seeds", "0", "--steps", "2",
              "--batch-size", "4", "--limit", "8", "--inversion-steps", "2", "--denoise-steps", "1",
              "--report", "", "--quiet", "--dm-categories", "colour"])
    finetune = [p.name for p in (tmp_path / "demo" / "attn").glob("*/finetune-*/*.safetensors")]
    expected = [it["id"] for it in data.read_items(world / "finetune.jsonl") if it.get("masks")][:8]
    assert finetune and all(p.split(".")[0].endswith("-colour") for p in finetune), finetune
    assert len(finetune) == sum(i.endswith("-colour") for i in expected)
    tests = [p.name for p in (tmp_path / "demo" / "attn").glob("*/test-id/*.safetensors")]
    assert any(p.split(".")[0].endswith("-shape") for p in tests)      # test maps: every category


def test_retraining_paths_write_loadable_models(small_world, tmp_path):
    """`toy.py train-sd` and `train-vlm` (a few steps here) write folders that load through the same
    code as the shipped ones: models.load_dm("toy-sd", path) and models.load_vlm("toy", path)."""
    world, _ = small_world
    base_models.train_sd(tmp_path / "sd", world, seed=3, steps=2, batch=4, vae_steps=2)
    dm = models.load_dm("toy-sd", path=tmp_path / "sd")
    positions = models.SD_SIZES["toy-sd"]["text_encoder"]["max_position_embeddings"]
    assert dm["res"] == 32 and dm["text_encoder"].config.max_position_embeddings == positions
    # --init-from (how the shipped toy-sd was continued): the VAE and its scaling factor are kept
    # frozen, the UNet moves on from the loaded weights
    base_models.train_sd(tmp_path / "sd2", world, seed=3, steps=2, batch=4, init_from=tmp_path / "sd")
    dm2 = models.load_dm("toy-sd", path=tmp_path / "sd2")
    assert dm2["vae"].config.scaling_factor == dm["vae"].config.scaling_factor
    for (name, a), b in zip(dm["vae"].state_dict().items(), dm2["vae"].state_dict().values()):
        assert torch.equal(a, b), name
    moved = [not torch.equal(a, b) for a, b in zip(dm["unet"].state_dict().values(), dm2["unet"].state_dict().values())]
    assert any(moved)
    base_models.train_vlm(tmp_path / "vlm", world, seed=3, steps=2, batch=4)
    model, processor = models.load_vlm("toy", str(tmp_path / "vlm"))
    assert json.loads((tmp_path / "vlm" / "training.json").read_text())["steps"] == 2
