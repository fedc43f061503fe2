"""Shared test fixtures: a tiny dataset on disk in the DESIGN.md formats, written from the spec.

The attention files are written here with safetensors directly (not through data.save_maps),
so that the readers are checked against the documented format rather than against the writer.
"""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One thread: the models here are tiny, and on a busy 2-core machine a second thread mostly waits
# (a tiny UNet call took 0.65 s on two threads against 0.04 s on one).
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


@pytest.fixture(scope="module")
def small_world(tmp_path_factory, monkeypatch_module):
    """The miniature world with small splits (the same generator, a hundredth of the images, at
    least 8 per split), drawn once per test module: (folder, {split: jsonl path})."""
    import world
    small = {k: (max(8, v[0] // 100), *v[1:]) for k, v in world.SPLITS.items()}
    monkeypatch_module.setattr(world, "SPLITS", small)
    out = tmp_path_factory.mktemp("world")
    return out, world.build_world(out, seed=3)


@pytest.fixture(autouse=True)
def one_thread():
    """Every test starts on one thread and leaves the count as it found it (toy.py sets
    --threads)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

# (question, answer) pairs drawn from the tiny preset's corpus, so most words are single tokens
# and a few ("red", "green") split into pieces.
QA = [("what colour is the circle?", "red circle"), ("what shape is red?", "a circle"),
      ("how many objects are there?", "two"), ("is there a green triangle?", "yes"),
      ("describe the image in one sentence.", "a red circle left of a blue square"),
      ("what colour is the circle?", "blue")]
# image sizes (width, height) that give the 1x1, 1x2, 2x1 and 2x2 tile layouts at 56 px tiles
SIZES = [(56, 56), (112, 50), (50, 112), (100, 100), (70, 40), (40, 70)]


def write_dataset(root, n=6, seed=0, with_attn=True):
    """Write n items (images, data.jsonl and, optionally, attn/<id>.safetensors) under root.

    Returns the JSONL path. Attention maps are random, min-max normalised, one per distinct word.
    """
    rng = np.random.default_rng(seed)
    root = os.fspath(root)
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    os.makedirs(os.path.join(root, "attn"), exist_ok=True)
    lines = []
    for i in range(n):
        q, a = QA[i % len(QA)]
        w, h = SIZES[i % len(SIZES)]
        item_id = f"item{i:03d}"
        pixels = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(os.path.join(root, "images", f"{item_id}.png"))
        lines.append({"id": item_id, "image": f"images/{item_id}.png", "question": q, "answer": a})
        if with_attn:
            words = list(dict.fromkeys(a.replace("?", "").split()))  # distinct, in order
            maps = torch.from_numpy(rng.random((len(words), 32, 32), dtype=np.float32))
            lo = maps.amin(dim=(1, 2), keepdim=True)
            hi = maps.amax(dim=(1, 2), keepdim=True)
            maps = (maps - lo) / (hi - lo)
            meta = {"words": json.dumps(words), "text": a, "dm": "test", "inversion_steps": "5",
                    "denoise_steps": "10", "res": "512"}
            attn_path = os.path.join(root, "attn", f"{item_id}.safetensors")
            save_file({"maps": maps.half()}, attn_path, metadata=meta)
    path = os.path.join(root, "data.jsonl")
    with open(path, "w") as f:
        for line in lines:
            f.write(json.dumps(line) + "\n")
    return path


@pytest.fixture
def tiny_dataset(tmp_path):
    """Path of a 6-item data.jsonl with images and attn/ beside it (see write_dataset)."""
    return write_dataset(tmp_path)


def extract_and_check_store(dm, items, out, **extract_kwargs):
    """Run extract.extract on items and check the one store format every teacher writes: a map
    per answer word (the word rule on the DM's tokenizer), 32x32, min-max normalised, with the
    DM's name and the text in its settings. Returns each item's settings."""
    import data
    import extract
    summary = extract.extract(items, dm, out, batch_size=2, progress=False, **extract_kwargs)
    assert (summary["done"], summary["failed"]) == (len(items), 0)
    settings = []
    for item in items:
        maps, words, meta = data.load_maps(data.maps_path(out, item["id"]))
        assert words == extract.text_words(dm["tokenizer"], item["answer"])[0]
        assert maps.shape == (len(words), 32, 32) and torch.isfinite(maps).all()
        assert maps.amin(dim=(1, 2)).eq(0).all() and maps.amax(dim=(1, 2)).eq(1).all()
        assert (meta["dm"], meta["res"], meta["text"]) == (dm["name"], 32, item["answer"])
        settings.append(meta)
    return settings
