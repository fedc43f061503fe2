"""Tests of evaluate.py and eval_report.py: scoring, attention measures, report files, and end to
end on the tiny preset.

Needs nothing downloaded; CPU. Run: python -m pytest -q tests/test_evaluate.py
"""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data
import eval_report
import evaluate as E
import figures
import metrics as M
import models
import runs

# ---- scoring ----


def test_normalize_answer():
    assert M.normalize_answer("The answer: Two red circles.") == "answer 2 red circles"
    assert M.normalize_answer("  A   RED circle!! ") == "red circle"
    # decimal point kept, final period dropped
    assert M.normalize_answer("3.5 cm.") == "3.5 cm"
    assert M.normalize_answer("Yes.") == M.normalize_answer("yes")
    assert M.normalize_answer("blue") != M.normalize_answer("red")


def test_parse_choices_and_extract_choice():
    q = "Which organ is shown? A. liver B. heart (C) lung D) brain"
    choices = M.parse_choices(q)
    assert choices == {"A": "liver", "B": "heart", "C": "lung", "D": "brain"}
    assert M.parse_choices("Which organ?\nA) liver\nB: heart") == {"A": "liver", "B": "heart"}
    assert M.parse_choices("what colour is the circle?") == {}
    cases = {"B": "B", "(B)": "B", "B.": "B", "B) heart": "B", "The answer is C": "C",
             "Answer: (D)": "D", "I think (A) is right": "A", "It is the heart.": "B", "lung": "C",
             "A red circle": None,            # the article, not a letter
             "the answer is a liver": "A",    # no letter: falls through to the option's text
             "heart or lung": None,           # two options named: undecided
             "no idea": None}
    for text, letter in cases.items():
        assert M.extract_choice(text, choices) == letter, text


def test_score_prediction():
    q = "Which organ? A. liver B. heart C. lung D. brain"
    assert M.score_prediction("B", "B", q) == {"correct": True, "kind": "choice", "letter": "B",
                                                "reference_letter": "B"}
    assert M.score_prediction("The answer is (C).", "(B) heart", q)["correct"] is False
    assert M.score_prediction("heart", "B. heart", q)["correct"] is True
    # no options listed: exact match after normalisation
    exact = M.score_prediction("Two.", "2", "how many objects are there?")
    assert exact == {"correct": True, "kind": "exact"}
    assert M.score_prediction("a red circle", "red", "what colour?")["correct"] is False


def test_wilson_interval_worked_example():
    # 8 of 10, z = 1.96: centre (0.8 + 0.19208) / 1.38416 = 0.71674,
    # half 1.96 * sqrt(0.016 + 0.009604) / 1.38416 = 0.22658
    lo, hi = M.wilson_interval(8, 10)
    assert lo == pytest.approx(0.49016, abs=1e-4) and hi == pytest.approx(0.94332, abs=1e-4)
    assert M.wilson_interval(0, 0) == (0.0, 1.0)
    lo, hi = M.wilson_interval(10, 10)
    # never the degenerate [1, 1] of the normal interval
    assert hi == pytest.approx(1.0) and 0.6 < lo < 0.75
    # symmetric at 1/2
    assert M.wilson_interval(50, 100)[0] == pytest.approx(1 - M.wilson_interval(50, 100)[1])


def test_accuracy_table_per_category():
    records = [{"correct": True, "category": "colour"}, {"correct": False, "category": "colour"},
               {"correct": True, "category": "count"}, {"correct": True}]
    table = M.accuracy_table(records)
    every = table["all"]
    assert every["accuracy"] == 0.75 and every["n"] == 4 and every["correct"] == 3
    assert table["colour"]["accuracy"] == 0.5 and table["count"]["n"] == 1
    assert set(table) == {"all", "colour", "count"}
    assert M.accuracy_table([])["all"]["accuracy"] is None


# ---- attention measures ----


def test_entropy_uniform_one_hot_and_two_hot():
    uniform = torch.full((32, 32), 0.3)
    one_hot = torch.zeros(32, 32)
    one_hot[4, 7] = 1.0
    two_hot = one_hot.clone()
    two_hot[20, 1] = 1.0
    h = E.attention_entropy(torch.stack([uniform, one_hot, two_hot]))
    assert h[0].item() == pytest.approx(math.log(1024), rel=1e-5)
    assert h[1].item() == 0.0
    assert h[2].item() == pytest.approx(math.log(2), rel=1e-5)
    # scale invariant (maps are normalised to sum 1 first); an all-zero map reads as uniform
    m = torch.rand(3, 32, 32)
    assert torch.allclose(E.attention_entropy(m), E.attention_entropy(5 * m), atol=1e-5)
    blank = E.attention_entropy(torch.zeros(32, 32)).item()
    assert blank == pytest.approx(math.log(1024), rel=1e-5)


def test_alignment_mse():
    a = torch.rand(4, 32, 32)
    assert torch.equal(E.alignment_mse(a, a.clone()), torch.zeros(4))
    half = torch.full((32, 32), 0.5)
    assert E.alignment_mse(torch.zeros(32, 32), half).item() == pytest.approx(0.25)


def test_pointing_on_a_hand_made_mask(tmp_path):
    # a 64 x 48 (w x h) image; the object occupies x 40..63, y 0..11 (top-right corner)
    w, h = 64, 48
    mask = np.zeros((h, w), dtype=np.uint8)
    mask[0:12, 40:64] = 255
    Image.new("RGB", (w, h)).save(tmp_path / "img.png")
    Image.fromarray(mask).save(tmp_path / "mask.png")
    item = {"id": "x", "image_path": str(tmp_path / "img.png"), "masks": {"Circle": "mask.png"},
            "boxes": {"square": [0, 24, 16, 48]}}
    regions = data.item_regions(item, tmp_path, lambda w: w.lower())
    assert set(regions) == {"circle", "square"} and regions["circle"].shape == (h, w)
    inside = torch.zeros(32, 32)
    # cell centre (3.5 * 48/32, 25.5 * 64/32) = (5.25, 51) -> pixel (5, 51): inside
    inside[3, 25] = 1.0
    edge = torch.zeros(32, 32)
    # (8.5 * 1.5, 20.5 * 2) = (12.75, 41) -> pixel (12, 41): one row below the mask
    edge[8, 20] = 1.0
    assert E.argmax_pixel(inside, h, w) == (5, 51) and E.argmax_pixel(edge, h, w) == (12, 41)
    assert E.pointing_hit(inside, regions["circle"]) and not E.pointing_hit(edge, regions["circle"])
    corner = torch.zeros(32, 32)
    corner[31, 0] = 1.0      # bottom-left: inside the box, outside the mask
    assert E.pointing_hit(corner, regions["square"])
    assert not E.pointing_hit(corner, regions["circle"])


# ---- report files and pictures ----


def fake_run(name, acc_flags, mse):
    records = [{"correct": c, "category": "k"} for c in acc_flags]
    return {"name": name, "accuracy": M.accuracy_table(records),
            "vlm_entropy": E.summarize([6.0, 6.5]), "alignment_mse": E.summarize([mse]),
            "matched_words": 1, "pointing": M.accuracy_summary([True, False])}


def test_report_files_one_row_per_run(tmp_path):
    report = {"data": "test.jsonl", "items": 3, "out": str(tmp_path), "figures": ["entropy.png"],
              "dm": {"entropy": E.summarize([3.0]), "pointing": None},
              "runs": [fake_run("ar", [True, False, False], 0.2),
                       dict(fake_run("lavender", [True, True, False], 0.1),
                            head={"entropy": E.summarize([5.0]),
                                  "alignment_mse": E.summarize([0.05]),
                                  "pointing": None, "matched_words": 1})]}
    eval_report.write_report(report, tmp_path)
    assert json.loads((tmp_path / "report.json").read_text())["runs"][1]["name"] == "lavender"
    md = (tmp_path / "report.md").read_text()
    # the main table: 7 columns
    table = [line.split("|") for line in md.splitlines() if line.count("|") == 8]
    own = [cells for cells in table if cells[2].strip() == "own"]
    assert [cells[1].strip() for cells in own] == ["ar", "lavender"]
    assert "33.3 [" in own[0][3] and "66.7 [" in own[1][3] and "0.1000" in own[1][5]
    assert [cells[1].strip() for cells in table if cells[2].strip() == "head"] == ["lavender"]
    assert any(cells[1].strip() == "DM (the target)" for cells in table)
    assert "## Accuracy per category" in md


def test_pictures_are_written(tmp_path):
    vlm_entropies = {"ar": [6.0, 6.5], "lavender": [3.0]}
    figures.draw_entropy_histograms(tmp_path / "h.png", [1.0, 2.0, 2.5], vlm_entropies)
    assert Image.open(tmp_path / "h.png").size[1] > 2 * 150
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 100, 3), dtype=np.uint8))
    figures.draw_overlay_grid(tmp_path / "o.png", image, ["red", "circle"], torch.rand(2, 32, 32),
                        {"ar": [torch.rand(32, 32), None], "lavender": [torch.rand(32, 32)] * 2})
    w, h = Image.open(tmp_path / "o.png").size
    assert w > 4 * 128 and h > 2 * 64          # 4 columns of 128 px, 2 rows of 64 px (aspect kept)


# ---- the model side ----


@pytest.mark.parametrize("preset", ["tiny", "tiny-idefics", "tiny-qwen2vl"])
def test_batched_greedy_generation_equals_one_by_one(tiny_dataset, preset):
    """Left padding must not change any item's greedy answer, in each family (Mllama, IDEFICS,
    Qwen2-VL: the README says batched generation works for all three)."""
    model, processor = models.load_vlm(preset)
    # 4 image sizes (Mllama: tile layouts 1x1, 1x2, 2x1, 2x2), prompts of different lengths
    items = data.read_items(tiny_dataset)[:4]
    batched = E.generate_answers(model.eval(), processor, items, batch_size=4, max_new_tokens=5,
                                 show=False)
    single = [E.generate_answers(model, processor, [it], batch_size=1, max_new_tokens=5,
                                 show=False)[0] for it in items]
    assert batched == single and any(batched)


def add_fields(jsonl, boxes_for=None):
    """Give the tiny dataset's items a category and, optionally, a box {word: [x0, y0, x1, y1]}
    per item id."""
    items = [json.loads(line) for line in open(jsonl)]
    for it in items:
        it["category"] = "colour" if "colour" in it["question"] else "other"
        if boxes_for and it["id"] in boxes_for:
            it["boxes"] = boxes_for[it["id"]]
    with open(jsonl, "w") as f:
        f.writelines(json.dumps(it) + "\n" for it in items)
    return items


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """The 6-item tiny dataset (attention store, categories, a box for "circle") and two 1-step runs
    written by train.py: --loss ar and --loss lavender (learned aggregation + sim Aligner)."""
    import train
    from conftest import write_dataset
    root = tmp_path_factory.mktemp("eval")
    data = write_dataset(root)
    # the items whose answers name a circle
    circle = {i: {"circle": [0, 0, 20, 20]} for i in ("item000", "item001", "item004")}
    add_fields(data, circle)
    runs = []
    for loss in ("ar", "lavender"):
        flags = ["--model", "tiny", "--data", data, "--out", str(root / "runs" / loss),
                 "--loss", loss, "--max-steps", "1", "--batch-size", "3", "--no-progress"]
        args = train.build_parser().parse_args(flags)
        runs.append(str(train.train(args)))
    return root, data, runs


def test_end_to_end_two_runs_and_base(two_runs, capsys):
    root, data, (ar, lavender) = two_runs
    out = root / "report"
    args = E.build_parser().parse_args(["--model", "tiny", "--base", "--run-dir", ar,
                                        "--run-dir", lavender, "--data", data,
                                        "--attn", str(root / "attn"), "--out", str(out),
                                        "--max-new-tokens", "3", "--batch-size", "4",
                                        "--figures", "2", "--quiet"])
    report = E.evaluate(args)
    assert [r["name"] for r in report["runs"]] == ["base", "ar", "lavender"]
    # predictions per item, scored as score_prediction scores them
    items = [json.loads(line) for line in open(data)]
    for r in report["runs"]:
        preds = [json.loads(line) for line in open(out / r["name"] / "predictions.jsonl")]
        assert [p["id"] for p in preds] == [it["id"] for it in items]
        rescored = [M.score_prediction(p["prediction"], p["answer"], p["question"]) for p in preds]
        assert all(p["correct"] == s["correct"] for p, s in zip(preds, rescored))
        assert r["accuracy"]["all"]["correct"] == sum(p["correct"] for p in preds)
        assert r["accuracy"]["colour"]["n"] + r["accuracy"]["other"]["n"] == 6
        # every matched word has an entropy and an MSE; the 3 boxed "circle"s are pointed at
        assert r["matched_words"] == r["vlm_entropy"]["n"] == r["alignment_mse"]["n"] > 0
        assert 0 < r["vlm_entropy"]["mean"] <= math.log(1024) + 1e-4
        assert r["pointing"]["n"] == 3
    # one ruler: every model's own maps are read the same way; a Lavender run's head as it was
    # trained
    settings = {r["name"]: r["settings"] for r in report["runs"]}
    assert settings["base"] == settings["ar"] == settings["lavender"]
    lavender_own = settings["lavender"]
    assert lavender_own["aggregation"] == "mean-mean" and lavender_own["aligner"] is None
    head = report["runs"][2]["head"]
    assert head["settings"]["aggregation"] == "learn" and head["settings"]["aligner"] == "Aligner"
    assert head["matched_words"] == report["runs"][2]["matched_words"]
    assert head["pointing"]["n"] == 3
    assert report["runs"][0]["head"] is None and report["runs"][1]["head"] is None
    assert report["items_with_attention"] == 6
    # the DM's maps of the same matched words
    dm = report["dm"]
    assert dm["entropy"]["n"] == report["runs"][0]["matched_words"] and dm["pointing"]["n"] == 3
    # files: the table has one row per model's own maps and one for the Lavender run's head
    md = (out / "report.md").read_text()
    table = [line.split("|") for line in md.splitlines()
             if line.count("|") == 8 and not line.startswith("|---")]
    assert [c[1].strip() for c in table if c[2].strip() == "own"] == ["base", "ar", "lavender"]
    assert [c[1].strip() for c in table if c[2].strip() == "head"] == ["lavender"]
    assert json.loads((out / "report.json").read_text())["runs"][2]["name"] == "lavender"
    assert Image.open(out / "entropy.png").size[1] > 3 * 150
    assert sorted(p.name for p in (out / "overlays").iterdir()) == ["item000.png", "item001.png"]
    summary = capsys.readouterr().out
    assert "evaluated 3 model(s) on 6 items" in summary and summary.count(" items/s") == 3
    assert all(r["items_per_second"] > 0 for r in report["runs"])


def test_two_ranks_write_the_one_process_report(two_runs, tmp_path):
    """torchrun --nproc_per_node 2 (gloo): each rank evaluates every other item, rank 0 gathers them
    back in item order; predictions, accuracy, matched words, pointing and pictures equal one
    process's, the MSE and entropies to float tolerance (other batch compositions)."""
    import os
    import subprocess
    import sys
    root, data, (ar, lavender) = two_runs
    flags = ["--model", "tiny", "--base", "--run-dir", ar, "--run-dir", lavender, "--data", data,
             "--attn", str(root / "attn"), "--max-new-tokens", "3", "--batch-size", "4",
             "--figures", "2", "--quiet"]
    one = E.evaluate(E.build_parser().parse_args([*flags, "--out", str(tmp_path / "one")]))
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    root_dir = Path(E.__file__).resolve().parent
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
               "2", str(root_dir / "evaluate.py"), *flags, "--out", str(tmp_path / "two")]
    done = subprocess.run(command, cwd=root_dir, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("evaluated 3 model(s) on 6 items") == 1  # rank 0 alone prints
    two = json.loads((tmp_path / "two" / "report.json").read_text())
    for a, b in zip(one["runs"], two["runs"]):
        assert a["name"] == b["name"] and a["accuracy"] == b["accuracy"]
        assert (tmp_path / "one" / a["name"] / "predictions.jsonl").read_text() == \
            (tmp_path / "two" / b["name"] / "predictions.jsonl").read_text()
        assert a["matched_words"] == b["matched_words"] > 0 and a["pointing"] == b["pointing"]
        for key in ("alignment_mse", "vlm_entropy"):
            assert b[key]["mean"] == pytest.approx(a[key]["mean"], abs=1e-5)
        if a["head"]:
            assert b["head"]["pointing"] == a["head"]["pointing"]
            head_entropy = a["head"]["entropy"]["mean"]
            assert b["head"]["entropy"]["mean"] == pytest.approx(head_entropy, abs=1e-5)
    overlays = sorted(p.name for p in (tmp_path / "two" / "overlays").iterdir())
    assert overlays == ["item000.png", "item001.png"]
    # the short alias
    assert E.build_parser().parse_args(["--data", "d", "--out", "o", "--run", "x"]).run == ["x"]


def test_runs_evaluate_in_bfloat16(two_runs, tmp_path):
    """--dtype bfloat16 loads the runs' VLMs in bf16 too (LoRA adapter, parallel projections; the
    Aligner stays fp32): the same words are matched and the maps stay close to fp32's."""
    root, data, (ar, lavender) = two_runs
    flags = ["--model", "tiny", "--run-dir", ar, "--run-dir", lavender, "--data", data,
             "--attn", str(root / "attn"), "--max-new-tokens", "2", "--figures", "0", "--quiet"]
    fp32 = E.evaluate(E.build_parser().parse_args([*flags, "--out", str(tmp_path / "fp32")]))
    bf16_flags = [*flags, "--out", str(tmp_path / "bf16"), "--dtype", "bfloat16"]
    bf16 = E.evaluate(E.build_parser().parse_args(bf16_flags))
    for a, b in zip(fp32["runs"], bf16["runs"]):
        assert a["matched_words"] == b["matched_words"] > 0
        assert b["alignment_mse"]["mean"] == pytest.approx(a["alignment_mse"]["mean"], abs=0.01)
    model, _, lavender_settings, _ = runs.load_run(lavender, dtype=torch.bfloat16)
    attn = next(m for m in model.modules() if hasattr(m, "lavender_q_proj"))
    assert attn.lavender_q_proj.weight.dtype == torch.bfloat16
    assert next(lavender_settings["aligner"].parameters()).dtype == torch.float32


def test_own_maps_as_targets_give_zero_mse_and_full_pointing(tmp_path, tiny_dataset):
    """Write the base model's own answer maps as the 'DM' store and a 1-pixel box at each map's
    argmax: the alignment MSE must be ~0 (float16 storage) and pointing 100%, which checks that
    words, maps, boxes and the argmax-to-pixel mapping are paired correctly end to end."""
    model, processor = models.tiny_vlm()
    items = data.read_items(tiny_dataset)
    args = E.build_parser().parse_args(["--model", "tiny", "--data", tiny_dataset,
                                        "--out", str(tmp_path), "--quiet"])
    own, head = E.capture_settings(None, model, args)
    assert head is None
    attn = Path(tiny_dataset).parent / "attn"
    dm_store = {it["id"]: data.load_maps(data.maps_path(attn, it["id"]))[:2] for it in items}
    maps = E.answer_maps(model.eval(), processor, items, dm_store, own, batch_size=3, show=False)
    boxes = {}
    for it, m in zip(items, maps):
        # the store's text is the item's answer (DESIGN.md)
        data.save_maps(tmp_path / "own" / f"{it['id']}.safetensors", m["own"], m["words"],
                       {"dm": "own", "text": it["answer"]})
        w, h = Image.open(it["image_path"]).size
        boxes[it["id"]] = {}
        for word, vlm_map in zip(m["words"], m["own"]):
            y, x = E.argmax_pixel(vlm_map, h, w)
            boxes[it["id"]][word] = [x, y, x + 1, y + 1]
    add_fields(tiny_dataset, boxes)
    args = E.build_parser().parse_args(["--model", "tiny", "--data", tiny_dataset,
                                        "--attn", str(tmp_path / "own"),
                                        "--out", str(tmp_path / "report"),
                                        "--max-new-tokens", "2", "--quiet"])
    run = E.evaluate(args)["runs"][0]
    assert run["matched_words"] == sum(len(m["words"]) for m in maps) > 0
    assert run["alignment_mse"]["mean"] < 1e-6
    assert run["pointing"]["accuracy"] == 1.0 and run["pointing"]["n"] == run["matched_words"]


def test_clear_errors(tmp_path, tiny_dataset):
    parse = E.build_parser().parse_args
    with pytest.raises(SystemExit, match="no attention file"):
        E.evaluate(parse(["--model", "tiny", "--data", tiny_dataset,
                          "--attn", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]))
    with pytest.raises(SystemExit, match="give --model"):
        E.evaluate(parse(["--data", tiny_dataset, "--out", str(tmp_path / "o")]))
    (tmp_path / "images" / "item002.png").write_bytes(b"not a png")
    with pytest.raises(SystemExit, match="item002"):
        E.evaluate(parse(["--model", "tiny", "--data", tiny_dataset, "--out", str(tmp_path / "o")]))


def test_broken_run_folders_and_items_are_named(tmp_path, tiny_dataset):
    """A run folder without config.json, with a config.json that is not JSON, or without its
    adapter, and an item with a truncated attention file or a missing mask: each is named in one
    message, before any model is loaded or any file written."""
    parse = E.build_parser().parse_args
    runs = {name: tmp_path / name for name in ("empty", "bad-json", "no-adapter")}
    for folder in runs.values():
        folder.mkdir()
    (runs["bad-json"] / "config.json").write_text('{"model": "tiny", ')
    config = {"model": "tiny", "model_path": None, "peft": "lora", "loss": "ar",
              "aggregate": "learn", "aligner": "sim", "aligner_mode": "per-layer", "match": "exact"}
    (runs["no-adapter"] / "config.json").write_text(json.dumps(config))
    run_flags = [x for r in runs.values() for x in ("--run-dir", str(r))]
    flags = ["--data", tiny_dataset, "--out", str(tmp_path / "o")] + run_flags
    with pytest.raises(SystemExit) as caught:
        E.evaluate(parse(flags))
    said = str(caught.value)
    assert f"--run-dir {runs['empty']}: config.json cannot be read" in said
    assert f"--run-dir {runs['bad-json']}: config.json cannot be read (JSONDecodeError" in said
    assert f"--run-dir {runs['no-adapter']}: adapter/adapter_config.json is missing" in said
    attn = Path(tiny_dataset).parent / "attn"
    stored = (attn / "item001.safetensors").read_bytes()
    (attn / "item001.safetensors").write_bytes(stored[:len(stored) // 2])
    add_fields(tiny_dataset)
    items = [json.loads(line) for line in open(tiny_dataset)]
    items[3]["masks"] = {"yes": "masks/none.png"}
    Path(tiny_dataset).write_text("".join(json.dumps(it) + "\n" for it in items))
    with pytest.raises(SystemExit) as caught:
        E.evaluate(parse(["--model", "tiny", "--data", tiny_dataset, "--attn", str(attn),
                          "--out", str(tmp_path / "o")]))
    said = str(caught.value)
    assert "item 'item001' (line 2): attention file" in said and "cannot be read" in said
    assert "item 'item003' (line 4): masks/boxes cannot be read (FileNotFoundError" in said
    assert not (tmp_path / "o").exists()


def test_an_id_cannot_write_outside_the_output_folder(tmp_path, tiny_dataset):
    """An item id like '../../x' is refused before anything is drawn: overlays/<id>.png would land
    outside --out."""
    items = [json.loads(line) for line in open(tiny_dataset)]
    items[0]["id"] = "../../escaped"
    Path(tiny_dataset).write_text("".join(json.dumps(it) + "\n" for it in items))
    attn = Path(tiny_dataset).parent / "attn"
    out = tmp_path / "deep" / "er" / "out"
    refused = r"item '\.\./\.\./escaped' \(line 1\): id cannot be a file name"
    with pytest.raises(SystemExit, match=refused):
        E.evaluate(E.build_parser().parse_args(["--model", "tiny", "--data", tiny_dataset,
                                                "--attn", str(attn), "--out", str(out), "--quiet"]))
    assert not list(tmp_path.rglob("escaped*"))
    with pytest.raises(ValueError, match="would leave"):
        figures.overlay_path(out, "../../escaped")


def test_own_maps_are_the_pretrained_attention_whatever_the_head(two_runs):
    """The one ruler: a Lavender run's own maps come from its pretrained attention A (the same
    layers and aggregation as any model's), untouched by its parallel projections and Aligner; its
    head maps come from them. Changing the projections changes the head and leaves the own maps."""
    root, data_path, (_, lavender_dir) = two_runs
    model, processor, lavender, _ = runs.load_run(lavender_dir)
    flags = ["--model", "tiny", "--data", data_path, "--out", str(root / "x")]
    args = E.build_parser().parse_args(flags)
    own, head = E.capture_settings(lavender, model, args)
    assert head["learned"] and own["aggregation"] == "mean-mean" and own["aligner"] is None
    items = data.read_items(data_path)
    stored = {it["id"]: data.read_maps(root / "attn", it["id"]) for it in items}
    store = {i: m for i, m in stored.items() if m[0] is not None}
    alone = E.answer_maps(model, processor, items, store, own, None, show=False)
    both = E.answer_maps(model, processor, items, store, own, head, show=False)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lavender_q_proj" in name:
                p.add_(torch.randn_like(p))
    moved = E.answer_maps(model, processor, items, store, own, head, show=False)
    assert sum(len(m["words"]) for m in both) > 0
    for a, b, c in zip(alone, both, moved):
        assert torch.equal(a["own"], b["own"]) and torch.equal(b["own"], c["own"])
    assert any(not torch.allclose(b["head"], c["head"]) for b, c in zip(both, moved) if b["words"])
