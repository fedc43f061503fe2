"""The benchmark files users already hold -> the project's JSONL: VLMEvalKit's TSVs and lmms-eval's
Parquet copies (prepare.py convert vlmevalkit / parquet).

VLMEvalKit (open-compass/VLMEvalKit) ships each benchmark as one TSV: a row per question with
columns index, image (the image file in base64), question, answer, the options A, B, C, ... of a
multiple-choice question (empty where a question has fewer), and often hint and category. To save
space an image cell may hold another row's index instead of an image (any cell of 1 to 64
characters, as vlmeval/dataset/image_base.py reads it); such a row shares that row's image file.
lmms-eval (EvolvingLMMs-Lab/lmms-eval) reads the lmms-lab copies on the Hugging Face hub: Parquet
files whose image column is the `datasets` Image struct {"bytes", "path"}, with the dataset's own
fields beside it (question_id, question, answers: strings or {"answer", ...} objects, answer,
multiple_choice_answer, answer_type, the options A-D, ...).

Both become items with the image bytes written, unchanged, beside the JSONL (<out stem>_images/
unless --images names another folder), the options written under the question as VLMEvalKit's
prompt writes them ("Hint: ...", "Question: ...", "Options:", "A. ...") without its closing "Please
select the correct answer from the options above." (metrics.parse_choices reads an option up to
the next one, so a line after the last would join it), and the metric VLMEvalKit scores with:
choice when there are options; anls for DocVQA and InfoVQA, relaxed for ChartQA (by the file's
path); vqa for a list of answers; else none given (evaluate.py's auto: exact match). A row with
several images, an image that is not JPEG/PNG/GIF/WebP/BMP/TIFF, or an index reference to no image
is skipped and counted. The TSV side needs the standard library only; Parquet needs pyarrow.

    python prepare.py convert vlmevalkit MMBench_DEV_EN.tsv --out data/mmbench_dev.jsonl
    python prepare.py convert parquet textvqa/validation-00000-of-00003.parquet --out textvqa.jsonl
"""
import ast
import base64
import binascii
import csv
import string
import sys
from collections import Counter, defaultdict
from pathlib import Path

LETTERS = string.ascii_uppercase  # the option columns, as VLMEvalKit reads them
MAGIC = [(b"\xff\xd8\xff", "jpg"), (b"\x89PNG\r\n\x1a\n", "png"), (b"GIF8", "gif"), (b"BM", "bmp"),
         (b"II*\x00", "tif"), (b"MM\x00*", "tif")]
REFERENCE_LENGTH = 64  # VLMEvalKit: an image cell of at most 64 characters is another row's index
PARQUET_IDS = ("question_id", "questionId", "index", "id")  # the first present names the item
NO_IMAGE = "image refers to no row's image"


def present(value):
    """A cell that holds something: not None, not empty, not blank (pandas reads these as NaN)."""
    return value is not None and str(value).strip() != ""


def image_kind(data):
    """The file extension of image bytes by their first bytes, or None: b"\\x89PNG..." -> "png"."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return next((ext for magic, ext in MAGIC if data.startswith(magic)), None)


def write_image(data, folder, name):
    """Write image bytes as folder/name.<ext>; the path, or the reason it is not an image."""
    ext = image_kind(data)
    if ext is None:
        return "image bytes are not JPEG, PNG, GIF, WebP, BMP or TIFF"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.{ext}"
    path.write_bytes(data)
    return path


def metric_for(path, options, answers):
    """The metric VLMEvalKit scores the file's items with (vlmeval/dataset/image_vqa.py picks it by
    the dataset's name; here by the file's path): choice, anls, relaxed, vqa, or None (auto)."""
    name = str(path).lower()
    if options:
        return "choice"
    if "docvqa" in name or "infovqa" in name:
        return "anls"
    if "chartqa" in name:
        return "relaxed"
    return "vqa" if len(answers) > 1 else None


def question_text(row):
    """The question with VLMEvalKit's hint and option lines (image_mcq.py build_prompt), and the
    options {letter: text}. {"question": "Which?", "A": "x", "B": "y"} ->
    ("Question: Which?\\nOptions:\\nA. x\\nB. y", {"A": "x", "B": "y"})."""
    options = {k: str(row[k]).strip() for k in LETTERS if present(row.get(k))}
    question = str(row["question"]).strip()
    if len(options) < 2:
        return question, {}
    hint = f"Hint: {str(row['hint']).strip()}\n" if present(row.get("hint")) else ""
    lines = "".join(f"\n{k}. {v}" for k, v in options.items())
    return f"{hint}Question: {question}\nOptions:{lines}", options


def answer_list(value, where):
    """The reference answers of a cell: a list (of strings or {"answer": ...} objects, lmms-eval), a
    Python list literal (VLMEvalKit's VQA TSVs: "['2', 'two']"), or one answer."""
    if isinstance(value, str) and value.strip().startswith("["):
        try:
            value = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            return [value.strip()]
    if not isinstance(value, (list, tuple)):
        return [str(value).strip()]
    answers = [a.get("answer") if isinstance(a, dict) else a for a in value]
    if not answers or not all(isinstance(a, str) for a in answers):
        raise ValueError(f"{where}: answers must be strings or {{'answer': string}} objects, "
                         f"got {str(value)[:80]}")
    return [a.strip() for a in answers]


def row_item(row, item_id, path, where):
    """One item (image left out) from a row of either layout; ValueError naming where if the row
    has no question or no answer."""
    if not present(row.get("question")):
        raise ValueError(f"{where}: no 'question'")
    question, options = question_text(row)
    given = row.get("answers") if present(row.get("answers")) else row.get("answer")
    if not present(given):
        raise ValueError(f"{where}: no 'answer' or 'answers' (a test split without answers?)")
    answers = answer_list(given, where)
    answer = next((str(row[k]).strip() for k in ("multiple_choice_answer", "answer")
                   if present(row.get(k)) and not isinstance(row[k], (list, tuple))
                   and not str(row[k]).strip().startswith("[")),
                  Counter(answers).most_common(1)[0][0])  # else the most common, the first on ties
    kinds = ("category", "answer_type", "type")
    category = next((str(row[k]) for k in kinds if present(row.get(k))), None)
    return {"id": item_id, "question": question, "answer": answer,
            **({"answers": answers} if len(answers) > 1 else {}),
            "metric": metric_for(path, options, answers), "category": category}


# ---- VLMEvalKit: TSV, images in base64 ----


def tsv_rows(path):
    """The rows of a VLMEvalKit TSV as dicts; ValueError naming the file if a column is missing."""
    csv.field_size_limit(min(sys.maxsize, 2 ** 31 - 1))  # a base64 image is far over csv's 128 KiB
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter="\t")
        missing = [c for c in ("index", "image", "question") if c not in (reader.fieldnames or [])]
        if missing:
            hint = " (a TSV with image_path only: the images are not inside it)" \
                if "image" in missing else ""
            raise ValueError(f"{path}: no column {', '.join(map(repr, missing))}{hint}; columns: "
                             f"{', '.join(reader.fieldnames or [])[:200]}")
        try:
            yield from reader
        except csv.Error as err:
            raise ValueError(f"{path}, line {reader.line_num}: not a readable TSV ({err})") \
                from None


def convert_vlmevalkit(paths, images, args):
    """VLMEvalKit TSV files (the module docstring): one item per row, id its index, the image
    decoded from base64 into `images`. A row whose image cell is another row's index yields after
    that row's image is written (later in the file is allowed), sharing its file."""
    for path in paths:
        written, failed, waiting = {}, {}, defaultdict(list)  # index -> image path / reason / items
        for n, row in enumerate(tsv_rows(path)):
            where, index = f"{path}, row {n + 1}", str(row["index"]).strip()
            cell = str(row["image"] or "").strip()
            item = row_item(row, index, path, where)
            if cell.startswith("["):
                yield "several images"
            elif 0 < len(cell) <= REFERENCE_LENGTH:  # another row's index
                if cell in written or cell in failed:
                    yield {**item, "image": written[cell]} if cell in written else failed[cell]
                else:
                    waiting[cell].append(item)
            else:
                try:
                    name = f"{Path(path).stem}_{n:07d}"
                    image = write_image(base64.b64decode(cell), images, name)
                except (binascii.Error, ValueError):
                    image = "image is not base64"
                if isinstance(image, str):
                    failed[index] = f"its image row was skipped ({image})"
                    yield image
                else:
                    written[index] = image
                    yield {**item, "image": image}
                for other in waiting.pop(index, []):
                    yield {**other, "image": image} if index in written else failed[index]
        for items in waiting.values():
            yield from [NO_IMAGE] * len(items)


# ---- lmms-eval: Parquet, images as the datasets Image struct ----


def parquet_rows(path):
    """The rows of a Parquet file as dicts (pyarrow, read a batch at a time)."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError("reading Parquet needs pyarrow, which is not installed: pip install "
                         "pyarrow (VLMEvalKit TSVs need nothing more: prepare.py convert "
                         "vlmevalkit)") from None
    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=64)
    except (OSError, ValueError) as err:  # pyarrow's ArrowInvalid is a ValueError
        raise ValueError(f"{path}: not a readable Parquet file ({err})") from None
    for batch in batches:
        yield from batch.to_pylist()


def convert_parquet(paths, images, args):
    """lmms-eval's Parquet copies (the module docstring): one item per row, id the first of
    question_id, questionId, index, id present (else <file>_<row>), the image bytes written to
    `images`. A row with several images, or an image held outside the file (no bytes), is
    skipped."""
    for path in paths:
        for n, row in enumerate(parquet_rows(path)):
            where, name = f"{path}, row {n + 1}", f"{Path(path).stem}_{n:07d}"
            item_id = next((row[k] for k in PARQUET_IDS if present(row.get(k))), name)
            item = row_item(row, item_id, path, where)
            image = row.get("image")
            if isinstance(image, list) and len(image) > 1:
                yield "several images"
                continue
            image = image[0] if isinstance(image, list) and image else image
            if not isinstance(image, dict) or not image.get("bytes"):
                yield "no image bytes in the file"
                continue
            image = write_image(image["bytes"], images, name)
            yield image if isinstance(image, str) else {**item, "image": image}
