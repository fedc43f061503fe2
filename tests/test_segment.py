"""Tests of segment.py: the metrics by hand and by brute force, the two readers on tiny files
written here (an HDF5 file in gtsegs_ijcv.mat's layout, skipped without h5py; a VOC-like folder
with palette PNGs), and `segment.py score` end to end on a store written with data.save_maps.

    OMP_NUM_THREADS=1 python -m pytest -q tests/test_segment.py     # seconds, nothing downloaded
"""
import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import data
import segment

MAP = np.array([[1.0, 0.5], [0.25, 0.0]])
MASK = np.array([[1, 0], [0, 0]], dtype=bool)


# ---- metrics ----

def test_worked_example_2x2():
    """The docstring's example, every figure by hand."""
    s = segment.score_map(MAP, MASK)
    assert (s["tp"], s["fp"], s["fn"], s["tn"]) == (1, 1, 0, 2)
    assert s["accuracy"] == 0.75 and s["iou_fg"] == 0.5 and s["iou_bg"] == pytest.approx(2 / 3)
    assert s["ap_fg"] == 1.0
    assert s["ap"] == pytest.approx(0.5 * 1 + 0.25 * 1 + 0.25 * 0.8)  # 0.95


def test_perfect_and_inverted_maps():
    """The mask as its own map scores 1 everywhere; the inverted map gets no pixel right."""
    mask = np.zeros((4, 4), dtype=bool)
    mask[1:3, 0:3] = True
    perfect = segment.summarise([segment.score_map(mask.astype(float), mask)])
    assert perfect["miou"] == perfect["pixel_accuracy"] == perfect["map"] == 1.0
    inverted = segment.summarise([segment.score_map(1.0 - mask, mask)])
    assert inverted["iou_fg"] == 0.0 and inverted["iou_bg"] == 0.0
    assert inverted["pixel_accuracy"] == 0.0 and inverted["map_fg"] < 0.5


def test_summarise_accumulates_over_the_dataset():
    """Counts are summed before the ratios (as ConceptAttention accumulates), AP averaged per
    image; the stacked mIoU is acc / (2 - acc)."""
    rows = [dict(tp=1, fp=1, fn=0, tn=2, ap=0.5, ap_fg=1.0),
            dict(tp=2, fp=0, fn=1, tn=1, ap=1.0, ap_fg=0.0)]
    s = segment.summarise(rows)
    assert s["pixel_accuracy"] == 0.75
    assert s["iou_fg"] == pytest.approx(3 / 5) and s["iou_bg"] == pytest.approx(3 / 5)
    assert s["miou"] == pytest.approx(0.6) and s["miou_stacked"] == pytest.approx(0.75 / 1.25)
    assert s["map"] == 0.75 and s["map_fg"] == 0.5
    # per image the foreground IoUs are 1/2 and 2/3: their mean (0.583) is not the pooled 0.6
    assert s["iou_fg"] != pytest.approx((1 / 2 + 2 / 3) / 2)


def brute_force_ap(scores, labels):
    """AP from its definition: at each distinct score t, highest first, precision and recall of
    'score >= t'; sum of (recall gain) x precision."""
    ap, last_recall = 0.0, 0.0
    for t in sorted(set(scores.tolist()), reverse=True):
        chosen = scores >= t
        precision = labels[chosen].sum() / chosen.sum()
        recall = labels[chosen].sum() / labels.sum()
        ap += (recall - last_recall) * precision
        last_recall = recall
    return ap


def test_average_precision_against_brute_force():
    rng = np.random.default_rng(0)
    for trial in range(20):
        n = int(rng.integers(5, 60))
        scores = np.round(rng.random(n), 1)  # one decimal: many ties
        labels = rng.random(n) < 0.3
        if not labels.any():
            labels[0] = True
        assert segment.average_precision(scores, labels) == pytest.approx(
            brute_force_ap(scores, labels)), trial
    assert segment.average_precision([0.9, 0.8, 0.7, 0.6], [1, 0, 1, 0]) == pytest.approx(5 / 6)
    assert segment.average_precision([0.3, 0.2], [0, 0]) == 0.0  # no positive


def test_map_resized_bilinear_to_the_mask():
    """[[1, 0], [0, 0]] to 4x4 (half-pixel centres): rows and columns weigh 1, .75, .25, 0, so the
    map is their outer product, its mean 0.25, and above it lies exactly the top-left 2x2."""
    soft = segment.resize_map(np.array([[1.0, 0.0], [0.0, 0.0]]), (4, 4))
    w = np.array([1, 0.75, 0.25, 0])
    np.testing.assert_allclose(soft, np.outer(w, w))
    mask = np.zeros((4, 4), dtype=bool)
    mask[:2, :2] = True
    assert segment.score_map(np.array([[1.0, 0.0], [0.0, 0.0]]), mask)["iou_fg"] == 1.0


def test_void_pixels_are_left_out():
    """The one wrong pixel of the 2x2 example (fp, top right) made void: the rest are right."""
    void = np.array([[0, 1], [0, 0]], dtype=bool)
    s = segment.score_map(MAP, MASK, void)
    assert (s["tp"], s["fp"], s["fn"], s["tn"]) == (1, 0, 0, 2) and s["accuracy"] == 1.0


def test_phrase_map_is_the_mean_of_its_words():
    maps = torch.stack([torch.zeros(32, 32), torch.ones(32, 32), torch.full((32, 32), 0.5)])
    words = ["golden", "retriever", "dog"]
    half = torch.full((32, 32), 0.5)
    assert torch.equal(segment.phrase_map(maps, words, "golden retriever"), half)
    assert torch.equal(segment.phrase_map(maps, words, "dog"), maps[2])
    assert segment.phrase_map(maps, words, "cat") is None


# ---- readers ----

def write_mat(path, images, masks, ids):
    """An HDF5 file in gtsegs_ijcv.mat's layout: /value/{img, gt, id} (N, 1) object references;
    images stored (3, W, H), masks (W, H) behind a (1, 1) cell of references, ids as uint16
    characters."""
    h5py = pytest.importorskip("h5py")
    with h5py.File(path, "w") as f:
        refs = {k: f.create_dataset(f"value/{k}", (len(images), 1), dtype=h5py.ref_dtype)
                for k in ("img", "gt", "id")}
        for i, (image, mask, name) in enumerate(zip(images, masks, ids)):
            refs["img"][i, 0] = f.create_dataset(f"#refs#/img{i}", data=image.T).ref
            inner = f.create_dataset(f"#refs#/gt{i}", data=mask.astype(np.uint8).T).ref
            cell = f.create_dataset(f"#refs#/cell{i}", (1, 1), dtype=h5py.ref_dtype)
            cell[0, 0] = inner
            refs["gt"][i, 0] = cell.ref
            chars = np.frombuffer(name.encode("utf-16-le"), dtype="<u2").reshape(-1, 1)
            refs["id"][i, 0] = f.create_dataset(f"#refs#/id{i}", data=chars).ref


def test_imagenet_reader_on_a_tiny_mat(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    colour = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)                    # (H, W, 3)
    grey = rng.integers(0, 256, (5, 4), dtype=np.uint8)                         # (H, W)
    masks = [np.zeros((6, 8), bool), np.zeros((5, 4), bool)]
    masks[0][1:4, 2:7] = True
    masks[1][0, :] = True
    write_mat(tmp_path / "gt.mat", [colour, grey], masks, ["n02084071_17", "n02121808_5"])
    (tmp_path / "names.json").write_text(json.dumps({"categories": {"n02084071": "dog"}}))
    monkeypatch.setattr(segment, "wordnet_lemma", lambda wnid: "domestic cat")
    path = segment.read_imagenet_segmentation(tmp_path / "gt.mat", tmp_path / "out",
                                              tmp_path / "names.json")
    items = data.read_items(path)
    assert [it["answer"] for it in items] == ["dog", "domestic cat"]
    assert [it["wnid"] for it in items] == ["n02084071", "n02121808"]
    np.testing.assert_array_equal(np.asarray(data.open_image(items[0]["image_path"])), colour)
    assert np.asarray(data.open_image(items[1]["image_path"])).shape == (5, 4, 3)
    for item, mask in zip(items, masks):
        regions = data.item_regions(item, tmp_path / "out", data.normalize_word)
        np.testing.assert_array_equal(regions[item["answer"]], mask)


def test_imagenet_class_word_without_names_or_wordnet(monkeypatch):
    monkeypatch.setattr(segment, "wordnet_lemma", lambda wnid: None)
    with pytest.raises(SystemExit, match="--class-names"):
        segment.class_word("n02084071", {})


def test_missing_h5py_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "h5py", None)  # import h5py raises ImportError
    with pytest.raises(SystemExit, match="pip install h5py"):
        segment.need_h5py()


def write_voc(root):
    """A VOC-like folder: val.txt of three images; a (cat, void border) image, a (dog, person)
    image, and a plane-only image (no background pixel)."""
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True)
    labels = {"a": np.zeros((6, 8), np.uint8), "b": np.zeros((6, 8), np.uint8),
              "c": np.ones((4, 4), np.uint8)}
    labels["a"][2:4, 2:5] = 8                        # cat
    labels["a"][1, 1:6] = 255                        # void
    labels["b"][0:2, 0:2], labels["b"][4:6, 4:6] = 12, 15
    palette = [v for i in range(256) for v in (i, 255 - i, (7 * i) % 256)]
    for name, lab in labels.items():
        png = Image.fromarray(lab, mode="P")
        png.putpalette(palette)
        png.save(root / "SegmentationClass" / f"{name}.png")
        Image.new("RGB", lab.shape[::-1], (9, 99, 199)).save(root / "JPEGImages" / f"{name}.jpg")
    (root / "ImageSets/Segmentation/val.txt").write_text("a\nb\nc\n")
    return labels


def test_voc_reader_keeps_single_class_images(tmp_path):
    labels = write_voc(tmp_path / "voc")
    items = data.read_items(segment.read_voc_single_class(tmp_path / "voc", tmp_path / "out"))
    assert [(it["id"], it["answer"]) for it in items] == [("voc-a", "cat"), ("voc-c", "plane")]
    regions = data.item_regions(items[0], tmp_path / "out", data.normalize_word)
    np.testing.assert_array_equal(regions["cat"], labels["a"] == 8)
    void = np.asarray(Image.open(tmp_path / "out" / items[0]["void"])) > 127
    np.testing.assert_array_equal(void, labels["a"] == 255)
    assert "void" not in items[1]
    assert (tmp_path / "out" / items[0]["image"]).read_bytes() == \
        (tmp_path / "voc/JPEGImages/a.jpg").read_bytes()


# ---- the score command ----

def test_score_command_end_to_end(tmp_path, capsys):
    """Two 32x32 items, one map the mask itself and one its inverse, one item without a map:
    the pooled counts give accuracy 1/2 and both IoUs tp / (tp + fp + fn) by hand."""
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    mask = np.zeros((32, 32), bool)
    mask[4:12, 8:24] = True                                          # 128 pixels of 1024
    items = []
    for k in range(3):
        Image.new("RGB", (32, 32)).save(tmp_path / f"images/{k}.png")
        Image.fromarray(np.where(mask, 255, 0).astype(np.uint8)).save(tmp_path / f"masks/{k}.png")
        items.append({"id": f"i{k}", "image": f"images/{k}.png", "question": "q?",
                      "answer": "a red dog", "masks": {"dog": f"masks/{k}.png"}})
    segment.write_jsonl(items, tmp_path / "d.jsonl")
    dog = torch.from_numpy(mask.astype(np.float32))
    for k, m in enumerate([dog, 1 - dog]):
        maps = torch.stack([torch.zeros(32, 32), torch.rand(32, 32), m])  # (3, 32, 32)
        data.save_maps(data.maps_path(tmp_path / "attn", f"i{k}"), maps, ["a", "red", "dog"],
                       {"text": "a red dog", "dm": "test"})
    segment.main(["score", "--data", str(tmp_path / "d.jsonl"), "--attn", str(tmp_path / "attn")])
    line = capsys.readouterr().out
    result = json.loads((tmp_path / "attn/segmentation.json").read_text())
    s = result["summary"]
    assert s["n"] == 2 and result["skipped"] == 1 and "segmentation of 2 maps" in line
    assert s["pixel_accuracy"] == 0.5
    assert s["iou_fg"] == pytest.approx(128 / (128 + 896 + 128))     # tp / (tp + fp + fn)
    assert s["iou_bg"] == pytest.approx(896 / (896 + 896 + 128))
    assert [r["id"] for r in result["rows"]] == ["i0", "i1"] and set(result["per_word"]) == {"dog"}
