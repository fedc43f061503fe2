"""What a user meets first: a Lavender run that aligns nothing says so, progress bars follow one
rule, a missing or malformed input file is one line (no traceback), phone photos are upright.

CPU, the `tiny` preset, nothing downloaded; the script runs are subprocesses of a few seconds.

    python -m pytest -q tests/test_user_runs.py
"""
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data
import evaluate
import extract
import loader
import train
from aligner import min_max

ROOT = Path(__file__).resolve().parents[1]


# ---- a --loss lavender run that aligns no word ----

def rare_word_dataset(root, n=4):
    """n items whose answer, and only DM word, is "xylophone": a random tiny model's predicted
    words never spell it, so --align-words predicted aligns nothing while label aligns it."""
    rng = np.random.default_rng(0)
    lines = []
    for i in range(n):
        item_id = f"rare{i}"
        pixels = rng.integers(0, 256, (56, 56, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / f"{item_id}.png")
        maps = torch.from_numpy(rng.random((1, 32, 32), dtype=np.float32))
        data.save_maps(data.maps_path(root / "attn", item_id), min_max(maps), ["xylophone"],
                       {"text": "xylophone", "dm": "test"})
        lines.append({"id": item_id, "image": f"{item_id}.png", "question": "what is it?",
                      "answer": "xylophone"})
    (root / "data.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return root / "data.jsonl"


def train_tiny(path, out, *flags):
    args = train.build_parser().parse_args(["--model", "tiny", "--data", str(path), "--out",
                                            str(out), "--quiet", "--batch-size", "2",
                                            "--max-steps", "6", *flags])
    train.train(args)
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_lavender_run_that_aligns_nothing_warns_and_says_so(tmp_path, capsys):
    path = rare_word_dataset(tmp_path)
    with pytest.warns(UserWarning, match=r"first 5 steps aligned no word .* --align-words label"):
        log = train_tiny(path, tmp_path / "predicted", "--align-words", "predicted")
    assert [row["aligned_words"] for row in log] == [0] * 6
    assert all(row["loss_att"] == 0 for row in log)
    assert "; 0 of 6 steps aligned a word;" in capsys.readouterr().out


def test_lavender_run_that_aligns_says_how_often(tmp_path, capsys, recwarn):
    log = train_tiny(rare_word_dataset(tmp_path), tmp_path / "label", "--align-words", "label")
    assert all(row["aligned_words"] == 2 for row in log)  # "xylophone" in both samples of a step
    assert "; 6 of 6 steps aligned a word;" in capsys.readouterr().out
    assert not [w for w in recwarn if "aligned no word" in str(w.message)]


def test_nothing_aligned_warning_only_for_lavender_after_five_empty_steps():
    args = train.build_parser().parse_args(["--loss", "lavender"])
    with pytest.warns(UserWarning, match="predicted aligns only the answer words the model"):
        train.warn_if_nothing_aligned(args, 5, 0)
    for steps, aligned, master in ((4, 0, True), (6, 0, True), (5, 1, True), (5, 0, False)):
        train.warn_if_nothing_aligned(args, steps, aligned, master)  # silent: an error if it warns
    train.warn_if_nothing_aligned(train.build_parser().parse_args(["--loss", "ar"]), 5, 0)


# ---- progress bars: one rule ----

class Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.parametrize("stream, show, drawn", [(Terminal, True, True), (Terminal, False, False),
                                                 (io.StringIO, True, False)])
def test_progress_bar_only_on_a_terminal_and_not_quiet(stream, show, drawn):
    out = stream()
    for _ in data.progress_bar(range(3), show, file=out, desc="x", mininterval=0):
        pass
    assert ("x: 100%" in out.getvalue()) == drawn


def test_library_bars_follow_the_same_rule(monkeypatch):
    from transformers.utils import logging
    monkeypatch.setattr(sys, "stderr", Terminal())
    data.library_bars(True)
    assert logging.is_progress_bar_enabled()
    data.library_bars(False)  # --quiet
    assert not logging.is_progress_bar_enabled()
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # a pipe or a log file
    data.library_bars(True)
    assert not logging.is_progress_bar_enabled()
    logging.enable_progress_bar()


def test_train_quiet_is_no_progress():
    parse = train.build_parser().parse_args
    assert parse([]).progress
    assert not parse(["--quiet"]).progress and not parse(["--no-progress"]).progress


# ---- a missing or malformed input: one line, no traceback ----

def stops(run, argv):
    """The one line a script ends with (SystemExit's message, which Python prints without a
    traceback) when run(argv) is refused."""
    with pytest.raises(SystemExit) as stop:
        run(argv)
    assert isinstance(stop.value.code, str) and "\n" not in stop.value.code
    return stop.value.code


def train_data(argv):
    return loader.read_data(train.build_parser().parse_args(argv))


def evaluate_main(argv):
    return evaluate.evaluate(evaluate.build_parser().parse_args(argv))


RUNS = {  # script -> (how it starts, its flags besides --data)
    "extract.py": (extract.main, ["--dm", "tiny-sd", "--out", "attn"]),
    "train.py": (train_data, ["--model", "tiny"]),
    "evaluate.py": (evaluate_main, ["--model", "tiny", "--out", "eval", "--quiet"]),
    "evaluate.py --score": (evaluate_main, ["--score", "p.jsonl", "--out", "eval"]),
}


@pytest.mark.parametrize("name", RUNS)
@pytest.mark.parametrize("problem", ["missing", "not json", "no answer"])
def test_scripts_name_a_bad_data_file_in_one_line(tmp_path, monkeypatch, name, problem):
    monkeypatch.chdir(tmp_path)
    no_answer = '{"id": "a", "image": "a.png", "question": "q"}\n'
    if problem != "missing":
        Path("data.jsonl").write_text("{oops\n" if problem == "not json" else no_answer)
    Path("p.jsonl").write_text('{"id": "a", "prediction": "x"}\n')
    run, flags = RUNS[name]
    line = stops(run, [*flags, "--data", "data.jsonl"])
    expected = {"missing": "^--data data.jsonl: no such file",
                "not json": "data.jsonl line 1: not valid JSON",
                "no answer": "data.jsonl line 1: field 'answer' must be a string"}[problem]
    assert re.search(expected, line), line


def test_missing_folders_and_prediction_files_are_named(tiny_dataset, tmp_path):
    none = tmp_path / "none"
    export = ["--data", tiny_dataset, "--out", str(none), "--export-jpeg", str(tmp_path / "j")]
    assert stops(extract.main, export).startswith(f"--out {none}: no such folder")
    imports = ["--data", tiny_dataset, "--import-jpeg", str(none), "--out", str(tmp_path / "a")]
    assert stops(extract.main, imports).startswith(f"--import-jpeg {none}: no such folder")
    score = ["--score", str(none), "--data", tiny_dataset, "--out", str(tmp_path / "eval")]
    assert "No such file" in stops(evaluate_main, score)


def test_extract_without_data_file_prints_one_line(tmp_path):
    """The same through the command line: one line on stderr, exit status 1, no traceback."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "extract.py"), "--data", "missing.jsonl"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and done.stderr.startswith("--data missing.jsonl: no such file")
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


# ---- images: EXIF orientation ----

@pytest.mark.parametrize("orientation, top", [(6, "red"), (8, "blue")])
def test_open_image_applies_exif_orientation(tmp_path, orientation, top):
    """A 40 x 20 photo, red left and blue right, stored with the tag a phone writes when held
    upright: 6 (turn 90° clockwise to view: the left side goes on top), 8 (counter-clockwise)."""
    pixels = np.zeros((20, 40, 3), dtype=np.uint8)
    pixels[:, :20] = (255, 0, 0)
    pixels[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = orientation  # Orientation
    Image.fromarray(pixels).save(tmp_path / "photo.jpg", exif=exif, quality=95)
    image = data.open_image(tmp_path / "photo.jpg")
    assert image.size == (20, 40)  # (width, height): upright
    colours = {"red": (255, 0, 0), "blue": (0, 0, 255)}
    other = "blue" if top == "red" else "red"
    assert np.abs(np.asarray(image)[5, 10].astype(int) - colours[top]).max() < 40
    assert np.abs(np.asarray(image)[35, 10].astype(int) - colours[other]).max() < 40
    x = data.load_image(tmp_path / "photo.jpg", 32)  # the DM's pixels (3, 32, 32), upright too
    assert x[:, 4, 16].argmax() == (0 if top == "red" else 2)  # the top's colour: red or blue
