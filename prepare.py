"""Dataset converters: a dataset's official release files -> the JSONL of DESIGN.md (the paper's
training and evaluation sets: LLaVA, VQAv2, OK-VQA, TextVQA, VizWiz, DocVQA, InfoVQA, ChartQA, COCO
and Flickr30k captions), keeping every reference answer for evaluate.py's metrics.

Each convert_* reads the files as the dataset's authors publish them (its docstring names the
files and fields), written from the formats' documentation, and yields one item per question
(per image for captions) with the image's absolute path, or a string saying why an entry is
skipped; write_converted makes ids safe file names, writes image paths relative to the output,
skips items whose image file is missing, and returns the counts for the summary line.
Items keep every reference answer in "answers" and the benchmark's metric in "metric" (read by
evaluate.py --metric auto); "answer", the label trained on and the text the DM is conditioned
on, is the dataset's own pick where it has one (VQAv2's multiple_choice_answer), else the most
common reference (ties: the first given).

    python prepare.py convert textvqa TextVQA_0.5.1_val.json --images train_images/ \\
        --out textvqa_val.jsonl
    python prepare.py convert llava llava_v1_5_mix665k.json --images /data/llava --out llava.jsonl
    python prepare.py convert vlmevalkit MMBench_DEV_EN.tsv --out mmbench.jsonl  # + mmbench_images/
"""
import argparse
import json
import os
import re
from collections import Counter
from pathlib import Path

from benchmark_files import convert_parquet, convert_vlmevalkit

CAPTION_PROMPT = "Describe the image in one sentence."
KINDS = {str: "a string", int: "an integer", list: "a list", dict: "an object", float: "a number"}


def load_json(path, top):
    """The parsed JSON of an official file; ValueError naming the file if it is not JSON or not a
    `top`."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, top):
        raise ValueError(f"{path}: expected {KINDS[top]} at the top level, got "
                         f"{type(data).__name__}")
    return data


def need(entry, key, kinds, where):
    """entry[key] when it is one of `kinds`; else ValueError naming the file and entry (where)
    and the field."""
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: expected an object, got {str(entry)[:80]}")
    value = entry.get(key)
    if not isinstance(value, kinds) or isinstance(value, bool):
        expected = " or ".join(KINDS[k] for k in kinds)
        got = "nothing" if key not in entry else repr(value)[:80]
        raise ValueError(f"{where}: field {key!r} must be {expected}, got {got}")
    return value


def need_strings(entry, key, where):
    """entry[key] when it is a list of strings; else ValueError naming where, the field and the
    element."""
    values = need(entry, key, list, where)
    for j, value in enumerate(values):
        if not isinstance(value, str):
            raise ValueError(f"{where}: field {key!r} must be a list of strings, but {key}[{j}] "
                             f"is {value!r:.80}")
    return values


def most_common(answers):
    """The most frequent answer, the first given on ties: ["b", "a", "a", "b", "c"] -> "b"."""
    return Counter(answers).most_common(1)[0][0]


def safe_id(raw):
    """A file-name-safe id (A-Z a-z 0-9 . _ -; it names attn/<id>.safetensors): every other
    character becomes "_", leading dots too (no hidden files), at most 100 characters.
    "COCO 2014/391895" -> "COCO_2014_391895";  "../x" -> "___x";  123 -> "123"."""
    text = re.sub(r"[^A-Za-z0-9._-]", "_", str(raw))[:100]
    return re.sub(r"^\.+", lambda m: "_" * len(m.group()), text) or "_"


def unique_id(raw, used):
    """safe_id(raw), then -2, -3, ... after it until it is not in `used`; added to used."""
    item_id, n = safe_id(raw), 1
    while item_id in used:
        n += 1
        item_id = f"{safe_id(raw)}-{n}"
    used.add(item_id)
    return item_id


def write_converted(entries, out_path, limit=0, suffix=""):
    """Write the converted items to out_path (atomically); returns (items written, Counter of skip
    reasons, {reason: first example}). Ids are made safe and unique (-2, -3, ... on repeats);
    image paths are written relative to the output's folder; a suffix goes on a new line after
    each question."""
    out_path = Path(out_path)
    out_dir = out_path.resolve().parent
    out_dir.mkdir(parents=True, exist_ok=True)
    written, skipped, examples, used = 0, Counter(), {}, set()
    tmp = out_dir / f".{out_path.name}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for entry in entries:
                if isinstance(entry, str) or not Path(entry["image"]).is_file():
                    reason = entry if isinstance(entry, str) else "image file missing"
                    example = None if isinstance(entry, str) else str(entry["image"])
                    skipped[reason] += 1
                    examples.setdefault(reason, example)
                    continue
                item_id = unique_id(entry["id"], used)
                # relative between resolved paths: data.read_items resolves the JSONL's folder too
                resolved = Path(entry["image"]).resolve()
                image = Path(os.path.relpath(resolved, out_dir)).as_posix()
                # (an absent category)
                fields = {k: v for k, v in entry.items() if v is not None}
                if suffix:
                    fields["question"] = f"{fields['question']}\n{suffix}"
                f.write(json.dumps({**fields, "id": item_id, "image": image}) + "\n")
                written += 1
                if written == limit:
                    break
        if written:
            os.replace(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)
    return written, skipped, examples


def convert_llava(paths, images, args):
    """LLaVA's instruction JSON (llava_v1_5_mix665k.json, llava_instruct_150k.json, ...): a list of
    {"id", "image": path under the image folder, "conversations": [{"from": "human", "value":
    "<image>\\nWhat is ...?"}, {"from": "gpt", "value": "..."}, ...]}. One item per human-gpt turn
    pair, id <id>_<turn>, the <image> marker removed. Entries without an image (text-only) or with
    several images are skipped. --images: the folder the "image" paths start from."""
    for path in paths:
        for i, entry in enumerate(load_json(path, list)):
            where = f"{path}, entry {i}"
            if isinstance(entry, dict) and "image" not in entry:
                yield "no image (a text-only conversation)"
                continue
            if isinstance(entry, dict) and isinstance(entry["image"], list):
                yield "several images"
                continue
            entry_id = need(entry, "id", (str, int), where)
            image = need(entry, "image", str, where)
            turns = need(entry, "conversations", list, where)
            for t in range(0, len(turns), 2):
                if t + 1 == len(turns):
                    yield "a last question without an answer"
                    break
                human = need(turns[t], "value", str, f"{where}, conversations[{t}]")
                gpt = need(turns[t + 1], "value", str, f"{where}, conversations[{t + 1}]")
                roles = (turns[t].get("from"), turns[t + 1].get("from"))
                if roles != ("human", "gpt"):
                    raise ValueError(f"{where}, conversations[{t}:{t + 2}]: field 'from' must be "
                                     f"'human' then 'gpt', got {roles}")
                question = human.replace("<image>", "").strip()
                yield {"id": f"{entry_id}_{t // 2}", "image": images / image,
                       "question": question, "answer": gpt.strip()}


def coco_image(images, image_id, subtype):
    """A COCO image's path: <images>/COCO_<subtype>_<id:012d>.jpg (2014 names), else 2017's
    <id:012d>.jpg."""
    subtypes = [subtype] if subtype else ["val2014", "train2014"]
    names = [f"COCO_{s}_{image_id:012d}.jpg" for s in subtypes]
    paths = [images / n for n in names + [f"{image_id:012d}.jpg"]]
    return next((p for p in paths if p.is_file()), paths[0])


def convert_vqav2(paths, images, args):
    """VQAv2 and OK-VQA (visualqa.org, okvqa.allenai.org), two files in either order: the questions
    (v2_OpenEnded_mscoco_val2014_questions.json; OK-VQA's OpenEnded_mscoco_val2014_questions.json),
    {"data_subtype": "val2014", "questions": [{"question_id", "image_id", "question"}]}, and the
    annotations (v2_mscoco_val2014_annotations.json; OK-VQA's mscoco_val2014_annotations.json),
    {"annotations": [{"question_id", "multiple_choice_answer", "answers": [{"answer", ...} x 10],
    "answer_type", ...}]}. --images: the COCO image folder (val2014/). category: the answer type
    (yes/no, number, other), as the official evaluation reports it; metric vqa."""
    files = vqa_files(paths)
    annotations = vqa_annotations(*files["annotations"])
    path, data = files["questions"]
    subtype = data.get("data_subtype")
    for i, q in enumerate(need(data, "questions", list, str(path))):
        where = f"{path}, entry {i}"
        qid = need(q, "question_id", int, where)
        image_id = need(q, "image_id", int, where)
        question = need(q, "question", str, where)
        if qid not in annotations or not annotations[qid][0]:
            yield "no annotated answers (a test split?)"
            continue
        answers, a = annotations[qid]
        # the dataset's own pick, the most common answer
        answer = a.get("multiple_choice_answer")
        answer = answer if isinstance(answer, str) else most_common(answers)
        yield {"id": qid, "image": coco_image(images, image_id, subtype), "question": question,
               "answer": answer, "answers": answers, "metric": "vqa",
               "category": a.get("answer_type")}


def vqa_files(paths):
    """{"questions": (path, data), "annotations": (path, data)} of VQAv2's two files, told apart
    by their top-level field; ValueError unless there is one of each."""
    files = {}
    for path in paths:
        data = load_json(path, dict)
        kind = next((k for k in ("questions", "annotations") if k in data), None)
        if kind is None:
            raise ValueError(f"{path}: field 'questions' (questions file) or 'annotations' "
                             f"(annotations file) missing")
        files[kind] = (path, data)
    if len(files) != 2:
        raise ValueError(f"vqav2 needs a questions file and an annotations file, got: "
                         f"{', '.join(map(str, paths))}")
    return files


def vqa_annotations(path, data):
    """{question_id: (its reference answers, its annotation)} of a VQAv2 annotations file."""
    annotations = {}
    for i, a in enumerate(need(data, "annotations", list, str(path))):
        where = f"{path}, entry {i}"
        listed = need(a, "answers", list, where)
        answers = [need(x, "answer", str, f"{where}, answers[{j}]") for j, x in enumerate(listed)]
        annotations[need(a, "question_id", int, where)] = (answers, a)
    return annotations


def convert_textvqa(paths, images, args):
    """TextVQA (textvqa.org): TextVQA_0.5.1_val.json, {"dataset_name": "textvqa", "data":
    [{"question_id", "question", "image_id", "answers": [10 strings], ...}]}. --images: the image
    folder (train_images/, which holds the val images too): <image_id>.jpg. metric vqa."""
    for path in paths:
        for i, entry in enumerate(need(load_json(path, dict), "data", list, str(path))):
            where = f"{path}, entry {i}"
            qid = need(entry, "question_id", (int, str), where)
            question = need(entry, "question", str, where)
            image_id = need(entry, "image_id", str, where)
            if not entry.get("answers"):
                yield "no answers (the test split?)"
                continue
            answers = need_strings(entry, "answers", where)
            yield {"id": qid, "image": images / f"{image_id}.jpg", "question": question,
                   "answer": most_common(answers), "answers": answers, "metric": "vqa"}


def convert_vizwiz(paths, images, args):
    """VizWiz VQA (vizwiz.org): val.json / train.json, a list of {"image":
    "VizWiz_val_00000000.jpg", "question", "answers": [{"answer", "answer_confidence"} x 10],
    "answer_type", "answerable"}. --images: the split's image folder (val/). id: the image's name
    (one question per image); category: the answer type (yes/no, number, other, unanswerable);
    metric vqa."""
    for path in paths:
        for i, entry in enumerate(load_json(path, list)):
            where = f"{path}, entry {i}"
            image = need(entry, "image", str, where)
            question = need(entry, "question", str, where)
            if not entry.get("answers"):
                yield "no answers (the test split?)"
                continue
            listed = need(entry, "answers", list, where)
            answers = [need(a, "answer", str, f"{where}, answers[{j}]")
                       for j, a in enumerate(listed)]
            yield {"id": Path(image).stem, "image": images / image, "question": question,
                   "answer": most_common(answers), "answers": answers, "metric": "vqa",
                   "category": entry.get("answer_type")}


def convert_docvqa(paths, images, args):
    """DocVQA (rrc.cvc.uab.es, single page): val_v1.0.json or val_v1.0_withQT.json,
    {"dataset_name": "docvqa", "data": [{"questionId", "question", "image":
    "documents/<page>.png", "answers": [...], ...}]}; InfoVQA's
    infographicsVQA_val_v1.0_withQT.json names the image "image_local_name". --images: the folder
    the image names start from (default: the JSON's own folder, as released). metric anls."""
    for path in paths:
        for i, entry in enumerate(need(load_json(path, dict), "data", list, str(path))):
            where = f"{path}, entry {i}"
            qid = need(entry, "questionId", (int, str), where)
            question = need(entry, "question", str, where)
            # InfoVQA's name, else DocVQA's
            field = "image_local_name" if "image_local_name" in entry else "image"
            image = need(entry, field, str, where)
            if not entry.get("answers"):
                yield "no answers (the test split?)"
                continue
            answers = need_strings(entry, "answers", where)
            yield {"id": qid, "image": images / image, "question": question,
                   "answer": most_common(answers), "answers": answers, "metric": "anls"}


def convert_chartqa(paths, images, args):
    """ChartQA (github.com/vis-nlp/ChartQA, "ChartQA Dataset/test/"): test_human.json and
    test_augmented.json, each a list of {"imgname": "<chart>.png", "query", "label"}. --images: the
    chart folder (default: png/ beside the JSON, as released). id <file>_<n>; category: the file's
    half (human, augmented), the two ChartQA reports; metric relaxed."""
    for path in paths:
        half = Path(path).stem.split("_")[-1]
        for i, entry in enumerate(load_json(path, list)):
            where = f"{path}, entry {i}"
            image = need(entry, "imgname", str, where)
            question = need(entry, "query", str, where)
            label = str(need(entry, "label", (str, int, float), where))
            yield {"id": f"{Path(path).stem}_{i}", "image": images / image, "question": question,
                   "answer": label, "answers": [label], "metric": "relaxed", "category": half}


def convert_captions(paths, images, args):
    """COCO and Flickr30k captions in Karpathy's split (dataset_coco.json,
    dataset_flickr30k.json): {"dataset", "images": [{"filepath": "val2014" (COCO only),
    "filename", "split": "train" | "val" | "test" | "restval", "cocoid" (COCO only), "sentences":
    [{"raw", "tokens", ...}]}]}. --images: the folder of filepath/filename (COCO: the one holding
    val2014/; Flickr30k: flickr30k-images/). Items of --split (test by default; all: every
    split): one per image, question --prompt, answer the first caption, answers all of them,
    metric cider; --per-caption: one item per caption (for training, as the paper trains on
    Flickr30k)."""
    for path in paths:
        for i, entry in enumerate(need(load_json(path, dict), "images", list, str(path))):
            where = f"{path}, entry {i}"
            name = need(entry, "filename", str, where)
            split = need(entry, "split", str, where)
            sentences = need(entry, "sentences", list, where)
            captions = [need(s, "raw", str, f"{where}, sentences[{j}]").strip()
                        for j, s in enumerate(sentences)]
            if args.split not in ("all", split):
                yield f"not in split {args.split}"
                continue
            # COCO: <filepath>/<filename>; Flickr30k: <filename>
            folder = need(entry, "filepath", str, where) if "filepath" in entry else ""
            image = images / folder / name
            has_coco_id = isinstance(entry.get("cocoid"), int)
            image_id = entry["cocoid"] if has_coco_id else Path(name).stem
            if not captions:
                yield "no captions"
            elif args.per_caption:
                for k, c in enumerate(captions):
                    yield {"id": f"{image_id}_{k}", "image": image, "question": args.prompt,
                           "answer": c}
            else:
                yield {"id": image_id, "image": image, "question": args.prompt,
                       "answer": captions[0], "answers": captions, "metric": "cider"}


# --format -> converter (vlmevalkit and parquet: benchmark_files.py)
CONVERTERS = {"llava": convert_llava, "vqav2": convert_vqav2, "okvqa": convert_vqav2,
              "textvqa": convert_textvqa, "vizwiz": convert_vizwiz, "docvqa": convert_docvqa,
              "infovqa": convert_docvqa, "chartqa": convert_chartqa,
              "coco-captions": convert_captions, "flickr30k": convert_captions,
              "vlmevalkit": convert_vlmevalkit, "parquet": convert_parquet}
# images inside the file: written beside the JSONL
WRITES_IMAGES = {"vlmevalkit", "parquet"}


def convert(args):
    """Run one converter (args from build_parser) and print the summary line; returns items
    written."""
    images = Path(args.images) if args.images else Path(args.files[0]).resolve().parent
    if args.images is None and args.format == "chartqa":
        images = images / "png"
    if args.images is None and args.format in WRITES_IMAGES:
        images = Path(args.out).parent / f"{Path(args.out).stem}_images"
    try:
        entries = CONVERTERS[args.format](args.files, images, args)
        written, skipped, examples = write_converted(entries, args.out, args.limit, args.suffix)
    except (OSError, ValueError) as err:
        raise SystemExit(f"convert {args.format}: {err}") from None
    # "reason: n, e.g. <first example>", most frequent first
    reasons = []
    for reason, n in skipped.most_common():
        example = f", e.g. {examples[reason]}" if examples[reason] else ""
        reasons.append(f"{reason}: {n}{example}")
    why = "; ".join(reasons)
    n_skipped = sum(skipped.values())
    line = f"convert {args.format}: wrote {written} items to {args.out}; skipped {n_skipped}"
    if why:
        line += f" ({why})"
    if not written:
        raise SystemExit(line + " -- nothing written: check the files and --images")
    print(line)
    return written


def build_parser():
    p = argparse.ArgumentParser(description="Dataset tools: convert a dataset's official release "
                                "files into the JSONL that extract.py, train.py and evaluate.py "
                                "read (DESIGN.md)")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("convert", help="official release files -> data.jsonl",
                       description="convert FORMAT FILE... --out data.jsonl; each format's files "
                                   "and fields are in the docstring of prepare.convert_<format>")
    c.add_argument("format", choices=CONVERTERS, help="the dataset's format (okvqa reads as "
                   "vqav2, infovqa as docvqa, flickr30k as coco-captions); vlmevalkit: "
                   "VLMEvalKit's TSVs, parquet: lmms-eval's Parquet copies (needs pyarrow), any "
                   "benchmark (benchmark_files.py)")
    c.add_argument("files", nargs="+", help="the official JSON file(s): vqav2/okvqa a questions "
                   "and an annotations file; chartqa test_human.json and/or test_augmented.json; "
                   "the others one file")
    c.add_argument("--images", default=None, help="the image folder the dataset's image names "
                   "start from (default: the first file's folder; chartqa: its png/); vlmevalkit "
                   "and parquet: the folder the images are written to (default: <out "
                   "stem>_images/ beside --out)")
    c.add_argument("--out", required=True, help="the JSONL to write (image paths are written "
                   "relative to it)")
    c.add_argument("--split", default="test", choices=["train", "val", "test", "restval", "all"],
                   help="captions: the Karpathy split to keep")
    c.add_argument("--prompt", default=CAPTION_PROMPT,
                   help="captions: the question of every item")
    c.add_argument("--per-caption", action=argparse.BooleanOptionalAction, default=False,
                   help="captions: one item per caption (training data) instead of one per image "
                   "with all captions")
    c.add_argument("--suffix", default="", help="a line added after every question, e.g. "
                   "\"Answer the question using a single word or phrase.\" (the short-answer "
                   "prompt of LLaVA-1.5's VQA evaluation)")
    c.add_argument("--limit", type=int, default=0, help="stop after N items (0: all)")
    return p


def main():
    args = build_parser().parse_args()
    if args.command == "convert":
        convert(args)


if __name__ == "__main__":
    main()
