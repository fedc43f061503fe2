"""Tests of prepare.py convert: small files in each dataset's official layout (written here from
the formats' documentation, never downloaded), converted to the JSONL of DESIGN.md, malformed
ones included. Pure Python and tiny files in tmp_path. Run: python -m pytest -q
tests/test_convert.py
"""
import base64
import csv
import io
import json
import sys
from pathlib import Path

import pytest
from PIL import Image

import metrics as M
import prepare
from data import read_items


def images(folder, *names):
    """Tiny PNG files (any extension) under folder; returns the folder."""
    folder = Path(folder)
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (4, 4)).save(folder / name, format="PNG")
    return folder


def dump(path, obj):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(obj))
    return str(path)


def convert(*flags):
    """Run `prepare.py convert FLAGS`; returns the written items read back as evaluate.py reads
    them."""
    args = prepare.build_parser().parse_args(["convert", *map(str, flags)])
    prepare.convert(args)
    return read_items(args.out)


# ---- helpers ----


def test_safe_id_and_most_common():
    assert prepare.safe_id("COCO 2014/391895") == "COCO_2014_391895"
    assert prepare.safe_id("../x") == "___x" and prepare.safe_id(123) == "123"
    assert prepare.safe_id("") == "_"
    assert len(prepare.safe_id("x" * 300)) == 100
    assert prepare.most_common(["b", "a", "a", "b", "c"]) == "b"     # ties: the first given


# ---- each format ----


LLAVA = [{"id": "000000033471", "image": "coco/train2017/000000033471.jpg",
          "conversations": [
              {"from": "human", "value": "<image>\nWhat are the colors of the bus?"},
              {"from": "gpt", "value": "White and red."},
              {"from": "human", "value": "What feature can be seen on the back of the bus?"},
              {"from": "gpt", "value": "An advertisement."}]},
         {"id": "text-only-1", "conversations": [{"from": "human", "value": "Hi"},
                                                 {"from": "gpt", "value": "Hello"}]},
         {"id": "a/b c", "image": "coco/train2017/000000033471.jpg",
          "conversations": [{"from": "human", "value": "Describe it.\n<image>"},
                            {"from": "gpt", "value": "A bus."},
                            {"from": "human", "value": "And?"}]}]


def test_llava_one_item_per_turn(tmp_path, capsys):
    src = dump(tmp_path / "llava" / "llava_v1_5_mix665k.json", LLAVA)
    images(tmp_path / "img", "coco/train2017/000000033471.jpg")
    items = convert("llava", src, "--images", tmp_path / "img",
                    "--out", tmp_path / "out" / "data.jsonl")
    # a safe file name
    assert [it["id"] for it in items] == ["000000033471_0", "000000033471_1", "a_b_c_0"]
    assert items[0]["question"] == "What are the colors of the bus?"
    assert items[0]["answer"] == "White and red."
    assert items[2]["question"] == "Describe it."                      # the <image> marker removed
    # relative to the output JSONL
    assert items[0]["image"] == "../img/coco/train2017/000000033471.jpg"
    assert Path(items[0]["image_path"]).is_file() and "answers" not in items[0]
    out = capsys.readouterr().out
    assert "wrote 3 items" in out and "skipped 2" in out
    assert "no image (a text-only conversation): 1" in out
    assert "a last question without an answer: 1" in out


def test_llava_malformed_entries_name_file_entry_and_field(tmp_path):
    images(tmp_path, "x.jpg")
    bad = [{"id": "1", "image": "x.jpg", "conversations": [{"from": "gpt", "value": "a"},
                                                            {"from": "human", "value": "b"}]}]
    with pytest.raises(SystemExit, match=r"bad.json, entry 0, conversations\[0:2\]: field 'from' "
                                         r"must be 'human' then"):
        convert("llava", dump(tmp_path / "bad.json", bad), "--out", tmp_path / "o.jsonl")
    bad = [LLAVA[0], {"id": "2", "image": "x.jpg"}]
    with pytest.raises(SystemExit, match="bad.json, entry 1: field 'conversations' must be a list, "
                                         "got nothing"):
        convert("llava", dump(tmp_path / "bad.json", bad), "--out", tmp_path / "o.jsonl")
    with pytest.raises(SystemExit, match="bad.json: expected a list at the top level, got dict"):
        convert("llava", dump(tmp_path / "bad.json", {"data": []}), "--out", tmp_path / "o.jsonl")
    (tmp_path / "broken.json").write_text('[{"id": 1,')
    with pytest.raises(SystemExit, match="broken.json: not valid JSON"):
        convert("llava", tmp_path / "broken.json", "--out", tmp_path / "o.jsonl")
    assert not (tmp_path / "o.jsonl").exists()        # nothing half-written


VQA_ANSWERS = ["2"] * 6 + ["two"] * 2 + ["3"] * 2


def vqa_files(root, answers=VQA_ANSWERS):
    questions = {"data_subtype": "val2014", "task_type": "Open-Ended", "questions": [
        {"image_id": 262148, "question": "How many dogs?", "question_id": 262148000},
        {"image_id": 262148, "question": "What colour?", "question_id": 262148001},
        {"image_id": 999, "question": "Where?", "question_id": 999000}]}
    annotations = {"annotations": [
        {"question_id": 262148000, "image_id": 262148, "question_type": "how many",
         "answer_type": "number", "multiple_choice_answer": "2",
         "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": k + 1}
                     for k, a in enumerate(answers)]},
        {"question_id": 999000, "image_id": 999, "answer_type": "other",
         "multiple_choice_answer": "park",
         "answers": [{"answer": "park", "answer_confidence": "yes", "answer_id": k + 1}
                     for k in range(10)]}]}
    return (dump(root / "v2_OpenEnded_mscoco_val2014_questions.json", questions),
            dump(root / "v2_mscoco_val2014_annotations.json", annotations))


def test_vqav2_keeps_all_ten_answers(tmp_path, capsys):
    q, a = vqa_files(tmp_path)
    images(tmp_path / "val2014", "COCO_val2014_000000262148.jpg")   # image 999 is missing
    # the two files in either order
    items = convert("vqav2", a, q, "--images", tmp_path / "val2014",
                    "--out", tmp_path / "vqa.jsonl")
    assert len(items) == 1
    it = items[0]
    assert it["id"] == "262148000" and it["answer"] == "2" and it["answers"] == VQA_ANSWERS
    assert it["metric"] == "vqa" and it["category"] == "number"
    assert it["image"] == "val2014/COCO_val2014_000000262148.jpg"
    out = capsys.readouterr().out
    assert "no annotated answers (a test split?): 1" in out
    assert "image file missing: 1, e.g." in out and "COCO_val2014_000000000999.jpg" in out
    # COCO 2017 file names work too (okvqa reads the same layout)
    images(tmp_path / "val2017", "000000262148.jpg")
    items = convert("okvqa", q, a, "--images", tmp_path / "val2017",
                    "--out", tmp_path / "okvqa.jsonl")
    assert items[0]["image"] == "val2017/000000262148.jpg"


def test_vqav2_malformed(tmp_path):
    q, a = vqa_files(tmp_path, answers=["2"] * 9 + [2])
    with pytest.raises(SystemExit, match=r"annotations.json, entry 0, answers\[9\]: field 'answer' "
                                         r"must be a string, got 2"):
        convert("vqav2", q, a, "--out", tmp_path / "o.jsonl")
    with pytest.raises(SystemExit, match="needs a questions file and an annotations file"):
        convert("vqav2", q, "--out", tmp_path / "o.jsonl")


def test_textvqa(tmp_path):
    answers = ["nokia"] * 7 + ["toshiba"] * 3
    release = {"dataset_name": "textvqa", "dataset_version": "0.5.1", "data": [
        {"question": "what is the brand of phone?", "image_id": "0054c91397f2fe05",
         "question_id": 34602, "answers": answers, "set_name": "val",
         "image_classes": ["Mobile phone"]},
        {"question": "what?", "image_id": "0054c91397f2fe05", "question_id": 34603,
         "answers": ["a"] * 9 + [None]}]}
    src = dump(tmp_path / "TextVQA_0.5.1_val.json", release)
    images(tmp_path / "train_images", "0054c91397f2fe05.jpg")
    with pytest.raises(SystemExit, match=r"entry 1: field 'answers' must be a list of strings, but "
                                         r"answers\[9\] is None"):
        convert("textvqa", src, "--images", tmp_path / "train_images",
                "--out", tmp_path / "t.jsonl")
    items = convert("textvqa", src, "--images", tmp_path / "train_images",
                    "--out", tmp_path / "t.jsonl", "--limit", 1,
                    "--suffix", "Answer the question using a single word or phrase.")
    assert items[0]["answer"] == "nokia" and items[0]["answers"] == answers
    assert items[0]["metric"] == "vqa"
    assert items[0]["question"] == ("what is the brand of phone?\nAnswer the question using a "
                                    "single word or phrase.")


def test_vizwiz(tmp_path):
    answers = ["unanswerable"] * 4 + ["coffee"] * 4 + ["tea"] * 2
    src = dump(tmp_path / "val.json", [
        {"image": "VizWiz_val_00000000.jpg", "question": "What is this?", "answerable": 1,
         "answer_type": "other",
         "answers": [{"answer": x, "answer_confidence": "yes"} for x in answers]},
        # no answers: the test split's layout
        {"image": "VizWiz_val_00000001.jpg", "question": "Which one?"}])
    images(tmp_path / "val", "VizWiz_val_00000000.jpg", "VizWiz_val_00000001.jpg")
    items = convert("vizwiz", src, "--images", tmp_path / "val", "--out", tmp_path / "v.jsonl")
    assert [it["id"] for it in items] == ["VizWiz_val_00000000"]
    # a tie: the first given
    assert items[0]["answer"] == "unanswerable" and len(items[0]["answers"]) == 10
    assert items[0]["category"] == "other" and items[0]["metric"] == "vqa"


def test_docvqa_and_infovqa(tmp_path):
    release = {"dataset_name": "docvqa", "dataset_split": "val", "data": [
        {"questionId": 49153,
         "question": "What is the ‘actual’ value per 1000, during the year 1975?",
         "image": "documents/pybv0228_81.png", "docId": 14465, "answers": ["0.28"],
         "data_split": "val"}]}
    src = dump(tmp_path / "val" / "val_v1.0.json", release)
    images(tmp_path / "val", "documents/pybv0228_81.png")
    # images beside the JSON, as released
    items = convert("docvqa", src, "--out", tmp_path / "d.jsonl")
    assert items[0]["id"] == "49153" and items[0]["answers"] == ["0.28"]
    assert items[0]["metric"] == "anls"
    assert items[0]["image"] == "val/documents/pybv0228_81.png"
    release = {"dataset_name": "infographicsVQA", "data": [
        {"questionId": 65718, "question": "Which country?", "image_local_name": "37313.jpeg",
         "answers": ["Canada", "canada"], "answer_type": ["single span"]}]}
    src = dump(tmp_path / "infographicsVQA_val_v1.0_withQT.json", release)
    images(tmp_path / "infographicsvqa_images", "37313.jpeg")
    items = convert("infovqa", src, "--images", tmp_path / "infographicsvqa_images",
                    "--out", tmp_path / "i.jsonl")
    assert items[0]["answers"] == ["Canada", "canada"] and items[0]["answer"] == "Canada"


def test_chartqa_two_halves(tmp_path):
    human = dump(tmp_path / "test" / "test_human.json",
                 [{"imgname": "41699051005347.png",
                   "query": "How many food item is shown in the bar graph?", "label": "14"}])
    augmented = dump(tmp_path / "test" / "test_augmented.json",
                     [{"imgname": "two_col_100.png", "query": "What is the value in 2019?",
                       "label": 12.5}])
    images(tmp_path / "test" / "png", "41699051005347.png", "two_col_100.png")
    # images in png/, as released
    items = convert("chartqa", human, augmented, "--out", tmp_path / "c.jsonl")
    halves = [(it["id"], it["category"], it["answer"]) for it in items]
    assert halves == [("test_human_0", "human", "14"), ("test_augmented_0", "augmented", "12.5")]
    assert items[0]["metric"] == "relaxed" and items[1]["answers"] == ["12.5"]


KARPATHY = {"dataset": "coco", "images": [
    {"filepath": "val2014", "filename": "COCO_val2014_000000391895.jpg", "imgid": 0,
     "split": "test",
     "cocoid": 391895, "sentids": [0, 1],
     "sentences": [{"tokens": ["a", "man"],
                    "raw": "A man with a red helmet on a small moped on a dirt road. ",
                    "imgid": 0, "sentid": 0},
                   {"tokens": ["man"],
                    "raw": "Man riding a motor bike on a dirt road on the countryside.",
                    "imgid": 0, "sentid": 1}]},
    {"filepath": "train2014", "filename": "COCO_train2014_000000057870.jpg", "imgid": 1,
     "split": "train", "cocoid": 57870,
     "sentences": [{"raw": "A restaurant has modern wooden tables.", "tokens": []}]}]}


def test_coco_captions_karpathy_split(tmp_path, capsys):
    src = dump(tmp_path / "dataset_coco.json", KARPATHY)
    images(tmp_path / "coco", "val2014/COCO_val2014_000000391895.jpg",
           "train2014/COCO_train2014_000000057870.jpg")
    items = convert("coco-captions", src, "--images", tmp_path / "coco",
                    "--out", tmp_path / "c.jsonl")
    assert len(items) == 1 and items[0]["id"] == "391895" and items[0]["metric"] == "cider"
    assert items[0]["question"] == prepare.CAPTION_PROMPT
    assert items[0]["answer"] == "A man with a red helmet on a small moped on a dirt road."
    assert len(items[0]["answers"]) == 2 and "not in split test: 1" in capsys.readouterr().out
    # training data: one item per caption, every split
    items = convert("coco-captions", src, "--images", tmp_path / "coco",
                    "--out", tmp_path / "t.jsonl",
                    "--split", "all", "--per-caption", "--prompt", "Caption this image.")
    assert [it["id"] for it in items] == ["391895_0", "391895_1", "57870_0"]
    assert "answers" not in items[0]
    assert items[2]["question"] == "Caption this image."


def test_flickr30k_karpathy_split(tmp_path):
    src = dump(tmp_path / "dataset_flickr30k.json", {"dataset": "flickr30k", "images": [
        {"filename": "1000092795.jpg", "imgid": 0, "split": "test",
         "sentences": [{"raw": "Two young guys with shaggy hair look at their hands.",
                        "tokens": []}]}]})
    images(tmp_path / "flickr30k-images", "1000092795.jpg")
    items = convert("flickr30k", src, "--images", tmp_path / "flickr30k-images",
                    "--out", tmp_path / "f.jsonl")
    assert items[0]["id"] == "1000092795"
    assert items[0]["image"] == "flickr30k-images/1000092795.jpg"
    with pytest.raises(SystemExit, match=r"entry 0, sentences\[0\]: field 'raw' must be a string, "
                                         r"got nothing"):
        KARPATHY_BAD = {"images": [{"filename": "x.jpg", "split": "test",
                                    "sentences": [{"tokens": []}]}]}
        convert("flickr30k", dump(tmp_path / "bad.json", KARPATHY_BAD),
                "--out", tmp_path / "b.jsonl")


def test_nothing_written_is_an_error(tmp_path):
    src = dump(tmp_path / "val.json", [{"image": "VizWiz_val_00000000.jpg", "question": "What?",
                                        "answers": [{"answer": "x"}] * 10}])
    with pytest.raises(SystemExit, match=r"wrote 0 items.*image file missing: 1.*nothing written"):
        convert("vizwiz", src, "--images", tmp_path / "nowhere", "--out", tmp_path / "v.jsonl")


def test_duplicate_ids_are_made_unique(tmp_path):
    entries = [{"image": "a.jpg", "question": "q", "answers": [{"answer": "x"}] * 10}] * 2
    images(tmp_path, "a.jpg")
    items = convert("vizwiz", dump(tmp_path / "val.json", entries), "--out", tmp_path / "v.jsonl")
    assert [it["id"] for it in items] == ["a", "a-2"]


# ---- converted data, scored by evaluate.py ----


def test_converted_textvqa_is_scored_with_vqa_accuracy(tmp_path):
    import evaluate as E
    answers = ["2"] * 2 + ["3"] * 8
    src = dump(tmp_path / "TextVQA_0.5.1_val.json", {"data": [
        {"question": "how many?", "image_id": "img1", "question_id": 1, "answers": answers},
        {"question": "which brand?", "image_id": "img1", "question_id": 2,
         "answers": ["nokia"] * 10}]})
    images(tmp_path / "train_images", "img1.jpg")
    convert("textvqa", src, "--images", tmp_path / "train_images",
            "--out", tmp_path / "textvqa.jsonl")
    (tmp_path / "pred.jsonl").write_text('{"id": "1", "prediction": "Two."}\n'
                                         '{"id": "2", "prediction": "Nokia"}\n')
    flags = ["--score", str(tmp_path / "pred.jsonl"), "--data", str(tmp_path / "textvqa.jsonl"),
             "--out", str(tmp_path / "eval")]
    report = E.evaluate(E.build_parser().parse_args(flags))
    assert report["runs"][0]["accuracy"]["all"]["accuracy"] == pytest.approx((0.6 + 1.0) / 2)
    assert report["runs"][0]["metrics"] == {"vqa": 2}


# ---- the benchmark files users already hold: VLMEvalKit TSV, lmms-eval Parquet ----


def image_bytes(fmt, colour):
    """A tiny image file's bytes in `fmt` (PNG, JPEG)."""
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), colour).save(buffer, format=fmt)
    return buffer.getvalue()


def write_tsv(path, header, rows):
    """A TSV as VLMEvalKit writes it (pandas to_csv, sep '\\t': csv's default quoting)."""
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, delimiter="\t")
        writer.writerow(header)
        writer.writerows(rows)
    return str(path)


def test_vlmevalkit_tsv_options_references_and_skips(tmp_path, capsys):
    """Rows 10 and 13 hold images (PNG, JPEG), 11 refers back to 10, 12 forward to 13; 14's image
    is no image, 15 refers to no row, 16 holds several: 4 items, 3 skipped."""
    png, jpeg = image_bytes("PNG", "red"), image_bytes("JPEG", "blue")

    def b64(data):
        return base64.b64encode(data).decode()
    header = ["index", "image", "question", "hint", "A", "B", "C", "D", "answer", "category"]
    rows = [[10, b64(png), "Which colour?", "Look closely", "red", "blue", "", "", "A", "colour"],
            [11, "10", "Which shape?", "", "circle", "square", "triangle", "", "C", "shape"],
            [12, "13", "Is it blue?", "", "yes", "no", "", "", "A", "colour"],
            [13, b64(jpeg), "Which colour?", "", "red", "blue", "", "", "B", "colour"],
            [14, b64(b"not an image, only text" * 4), "Q?", "", "x", "y", "", "", "A", ""],
            [15, "99", "Q?", "", "x", "y", "", "", "A", ""],
            [16, str([b64(png), b64(png)]), "Q?", "", "x", "y", "", "", "A", ""]]
    tsv = write_tsv(tmp_path / "MMBench_DEV_EN.tsv", header, rows)
    items = convert("vlmevalkit", tsv, "--out", tmp_path / "out" / "mmbench.jsonl")
    said = capsys.readouterr().out
    assert "wrote 4 items" in said and "skipped 3" in said and "several images: 1" in said
    assert [it["id"] for it in items] == ["10", "11", "13", "12"]  # 12 waits for 13's image
    first = items[0]
    assert first["question"] == ("Hint: Look closely\nQuestion: Which colour?\nOptions:\nA. red\n"
                                 "B. blue")
    assert first["answer"] == "A" and first["metric"] == "choice" and first["category"] == "colour"
    assert M.parse_choices(first["question"]) == {"A": "red", "B": "blue"}
    # image paths are relative to the JSONL's folder
    out = tmp_path / "out"
    assert Path(first["image"]).parent == Path("mmbench_images")
    assert (out / first["image"]).read_bytes() == png
    assert items[1]["image"] == first["image"]  # a reference shares its row's file
    assert items[3]["image"] == items[2]["image"] and Path(items[2]["image"]).suffix == ".jpg"
    assert (out / items[2]["image"]).read_bytes() == jpeg
    assert len(list((out / "mmbench_images").iterdir())) == 2
    scores = [r["score"] for r in M.score_items(items, ["A", "C", "(B)", "B"])]
    assert scores == [1.0, 1.0, 1.0, 0.0]


def test_vlmevalkit_vqa_tsv_answers_and_bad_files(tmp_path):
    """A VQA TSV's answer cell is a Python list literal: all ten kept, metric vqa by the number of
    answers; DocVQA's by the file name (anls). A missing column or answer names the file and row."""
    png = base64.b64encode(image_bytes("PNG", "green")).decode()
    answers = str(["two"] * 3 + ["2"] * 6 + ["3"])
    tsv = write_tsv(tmp_path / "TextVQA_VAL.tsv", ["index", "image", "question", "answer"],
                    [[0, png, "How many?", answers]])
    [item] = convert("vlmevalkit", tsv, "--out", tmp_path / "textvqa.jsonl")
    assert item["answers"] == ["two"] * 3 + ["2"] * 6 + ["3"] and item["answer"] == "2"
    assert item["metric"] == "vqa" and "category" not in item
    doc = write_tsv(tmp_path / "DocVQA_VAL.tsv", ["index", "image", "question", "answer"],
                    [[0, png, "Title?", str(["Report", "report 2020"])]])
    assert convert("vlmevalkit", doc, "--out", tmp_path / "doc.jsonl")[0]["metric"] == "anls"
    bare = write_tsv(tmp_path / "bare.tsv", ["index", "image_path", "question"],
                     [[0, "a.jpg", "Q?"]])
    with pytest.raises(SystemExit, match=r"bare.tsv: no column 'image' \(a TSV with image_path"):
        convert("vlmevalkit", bare, "--out", tmp_path / "bare.jsonl")
    test_split = write_tsv(tmp_path / "test.tsv", ["index", "image", "question"], [[0, png, "Q?"]])
    with pytest.raises(SystemExit, match=r"test.tsv, row 1: no 'answer' or 'answers'"):
        convert("vlmevalkit", test_split, "--out", tmp_path / "test.jsonl")


def test_parquet_needs_pyarrow_and_says_so(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow then raises ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(SystemExit, match="convert parquet: reading Parquet needs pyarrow.*pip"):
        convert("parquet", tmp_path / "x.parquet", "--out", tmp_path / "x.jsonl")


def test_lmms_eval_parquet_vqav2_layout(tmp_path):
    """lmms-lab/VQAv2's columns: answers as {"answer", "answer_confidence", "answer_id"} objects,
    the image as the datasets Image struct; a row without image bytes is skipped. Needs pyarrow."""
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    png = image_bytes("PNG", "red")
    answers = [[{"answer": a, "answer_confidence": "yes", "answer_id": i + 1}
                for i, a in enumerate(x)] for x in (["yes"] * 9 + ["no"], ["2"] * 10)]
    table = pa.table({"question_id": [7, 8], "question": ["Is it red?", "How many?"],
                      "answers": answers,
                      "multiple_choice_answer": ["yes", "2"], "answer_type": ["yes/no", "number"],
                      "image": [{"bytes": png, "path": "a.png"}, {"bytes": None, "path": "b.png"}]})
    pq.write_table(table, str(tmp_path / "validation-00000-of-00001.parquet"))
    path = tmp_path / "validation-00000-of-00001.parquet"
    [item] = convert("parquet", path, "--out", tmp_path / "v.jsonl")
    assert item["id"] == "7" and item["answer"] == "yes" and item["answers"] == ["yes"] * 9 + ["no"]
    assert item["metric"] == "vqa" and item["category"] == "yes/no"
    assert (tmp_path / item["image"]).read_bytes() == png
