"""Tests of metrics.py: each metric against the worked examples of its docstring (checkable by
hand), the intervals, the per-item choice of metric, prediction files, and evaluate.py --score
(eval_report.score_files) end to end.

Pure functions and tiny files in tmp_path; no model, nothing downloaded. Run:
python -m pytest -q tests/test_metrics.py
"""
import csv
import json
import math

import pytest

import metrics as M

# ---- exact match ----


def test_exact_match_worked_example():
    assert M.exact_match("Two dogs.", ["2 dogs", "puppies"]) == 1.0
    assert M.exact_match("dogs", ["2 dogs", "puppies"]) == 0.0
    assert M.exact_match("The Puppies!", ["2 dogs", "puppies"]) == 1.0


# ---- VQA accuracy ----


def test_vqa_normalize_worked_examples():
    assert M.vqa_normalize("Two dogs.") == "2 dogs"          # number word, final period
    assert M.vqa_normalize("dont know") == "don't know"      # the official contractions list
    assert M.vqa_normalize("black/white") == "black white"   # a mark between words becomes a space
    assert M.vqa_normalize("1,000") == "1000"                # digit-comma-digit: marks are deleted
    assert M.vqa_normalize("yes, it is") == "yes it is"      # a mark next to a space is deleted
    assert M.vqa_normalize("3.5") == "3.5"                   # a period before a digit stays
    assert M.vqa_normalize("The answer is none.") == "answer is 0"   # articles go, "none" is 0
    assert M.vqa_normalize(" Yes\n") == "yes"


def test_vqa_accuracy_worked_example():
    # 2 x "2", 8 x "3": (2 * 1/3 + 8 * 2/3) / 10 = 0.6, not min(2/3, 1)
    assert M.vqa_accuracy("Two.", ["2"] * 2 + ["3"] * 8) == pytest.approx(0.6)
    # 3 x "2", 7 x "3": leave out a "2" -> 2/3 (3 subsets); a "3" -> min(3/3, 1) = 1 (7): 0.9
    assert M.vqa_accuracy("2", ["2"] * 3 + ["3"] * 7) == pytest.approx(0.9)
    assert M.vqa_accuracy("yes", ["yes"] * 10) == 1.0
    assert M.vqa_accuracy("no", ["yes"] * 10) == 0.0
    # both sides normalised
    assert M.vqa_accuracy("don't know", ["dont know"] * 4 + ["no"] * 6) == 1.0
    # one reference: no one to leave out, so an exact match after normalisation
    assert M.vqa_accuracy("The dog.", ["dog"]) == 1.0 and M.vqa_accuracy("cat", ["dog"]) == 0.0


RULES = ("vlmevalkit", "lmms-eval", "lmms-eval-textvqa", "official")  # the order of `expected`


@pytest.mark.parametrize("prediction, answers, expected", [
    # case: ten "yes" agree, so the official script processes nothing and compares "Yes" == "yes"
    ("Yes", ["yes"] * 10, (1, 1, 1, 0)),
    # number word, article, hyphen against unanimous references: the same, processed or not
    ("two", ["2"] * 10, (1, 1, 1, 0)),
    ("a dog", ["dog"] * 10, (1, 1, 1, 0)),
    ("t-shirt", ["t shirt"] * 10, (1, 1, 1, 0)),
    # split references: every rule processes both sides; "-" between letters becomes a space, so
    # "t-shirt" = the 4 "t shirt": leave out one of them -> 3 others -> 1; one of the 6 -> 4 -> 1
    ("t-shirt", ["t shirt"] * 4 + ["shirt"] * 6, (1, 1, 1, 1)),
    # trailing period after a word: deleted by every rule once processed -> "dog" (4 of 10) -> 1
    ("dog.", ["dog"] * 4 + ["cat"] * 6, (1, 1, 1, 1)),
    ("dog.", ["dog"] * 10, (1, 1, 1, 0)),  # unanimous: "dog." != "dog"
    # trailing period after a digit: VLMEvalKit's (?<!\d)\.(?!\d) keeps it ("2." != "2"); the
    # official and lmms-eval pattern deletes it -> "2", 4 of 10 -> 1
    ("2.", ["2"] * 4 + ["3"] * 6, (0, 1, 1, 1)),
    # "Two." -> "2": 2 x "2", 8 x "3" -> (2 x 1/3 + 8 x 2/3) / 10 = 0.6 under every rule
    ("Two.", ["2"] * 2 + ["3"] * 8, (0.6, 0.6, 0.6, 0.6)),
    # "1,,000": lmms-eval's digit-comma test (?<=\d),+(?=\d) matches, so the commas are deleted
    # -> "1000" (4 of 10) -> 1, and its TextVQA processor deletes commas first (the same); the
    # others' \d,\d does not match, each comma becomes a space -> "1 000" -> 0
    ("1,,000", ["1000"] * 4 + ["100"] * 6, (0, 1, 1, 0)),
    # lmms-eval's TextVQA processor deletes every comma first: "black,white" -> "blackwhite";
    # the others space it -> "black white" (3 of 10: leave out one of them -> 2/3, else 1) = 0.9
    ("black,white", ["black white"] * 3 + ["white"] * 7, (0.9, 0.9, 0, 0.9)),
    # every harness passes re.UNICODE (= 32) as sub's count: of 33 periods one is left
    ("yes" + "." * 33, ["yes"] * 4 + ["no"] * 6, (0, 0, 0, 0)),
    ("yes" + "." * 32, ["yes"] * 4 + ["no"] * 6, (1, 1, 1, 1)),
])
def test_vqa_rules_where_they_agree_and_part(prediction, answers, expected):
    """Expected values derived by hand from each harness's code (vqa_rules.py names the files),
    in the order of RULES."""
    for rule, want in zip(RULES, expected):
        assert M.vqa_accuracy(prediction, answers, rule=rule) == pytest.approx(want), rule


def test_vqa_rule_by_name_through_score_items():
    item = {"id": "q1", "question": "Is it?", "answer": "yes", "answers": ["yes"] * 10,
            "metric": "vqa"}
    assert M.score_items([item], ["Yes"])[0]["score"] == 1.0  # default: vlmevalkit
    assert M.score_items([item], ["Yes"], vqa_rule="official")[0]["score"] == 0.0
    with pytest.raises(ValueError, match="unknown VQA rule 'coco'.*official"):
        M.score_items([item], ["Yes"], vqa_rule="coco")
    assert "official rule" in M.describe_metric("auto", "official")


# ---- ANLS and relaxed accuracy ----


def test_levenshtein():
    assert M.levenshtein("smiht", "smith") == 2
    assert M.levenshtein("kitten", "sitting") == 3
    assert M.levenshtein("", "abc") == 3 and M.levenshtein("abc", "abc") == 0


def test_anls_worked_example():
    # "smiht" vs "smith": NL = 2/5 -> 0.6;  vs "j. smith": NL = 5/8 >= 0.5 -> 0
    assert M.anls("Smiht", ["Smith", "J. Smith"]) == pytest.approx(0.6)
    assert M.levenshtein("smiht", "j. smith") == 5
    assert M.anls("  J.   SMITH ", ["j. smith"]) == 1.0          # lower case, whitespace collapsed
    assert M.anls("1990", ["1999"]) == pytest.approx(0.75)        # NL = 1/4
    assert M.anls("ab", ["cd"]) == 0.0 and M.anls("", [""]) == 1.0
    assert M.anls("abcd", ["abef"]) == 0.0                        # NL = 0.5 is not < 0.5


def test_relaxed_accuracy_worked_examples():
    assert M.relaxed_accuracy("13", ["12.5"]) == 1.0      # |13 - 12.5| / 12.5 = 0.04
    assert M.relaxed_accuracy("13.2", ["12.5"]) == 0.0    # 0.056
    assert M.relaxed_accuracy("45%", ["0.45"]) == 1.0     # a percentage is read as a fraction
    assert M.relaxed_accuracy("Yes", ["yes"]) == 1.0      # text: equal when lower-cased
    assert M.relaxed_accuracy("13 cars", ["13"]) == 0.0   # not a number, not the same text
    # 0 compared as text
    assert M.relaxed_accuracy("0.01", ["0"]) == 0.0 and M.relaxed_accuracy("0", ["0"]) == 1.0
    assert M.relaxed_accuracy("7", ["3", "7.2"]) == 1.0   # any reference


# ---- multiple choice beyond D ----


def test_choices_run_to_the_last_option_listed():
    q = "Which one? A. red B. green C. blue D. black E. white F. grey"
    choices = M.parse_choices(q)
    assert list(choices) == ["A", "B", "C", "D", "E", "F"] and choices["F"] == "grey"
    assert M.extract_choice("(E)", choices) == "E"
    assert M.extract_choice("The answer is F", choices) == "F"
    assert M.extract_choice("white", choices) == "E"
    initials = M.parse_choices("Who wrote it? A. J. Smith B. K. Lee")
    assert initials == {"A": "J. Smith", "B": "K. Lee"}
    three = M.parse_choices("Pick: A) x B) y C) z")
    assert M.extract_choice("D", three) is None          # only the letters listed count
    assert M.score_prediction("E", "E. white", q)["correct"] is True


# ---- CIDEr-D ----


def test_caption_tokens():
    assert M.caption_tokens("A man's dog, running.") == ["a", "man", "'s", "dog", "running"]
    tokens = M.caption_tokens('I don\'t see a t-shirt... (3.5 m) "ok"')
    assert tokens == ["i", "do", "n't", "see", "a", "t-shirt", "3.5", "m", "ok"]
    assert M.ngram_counts(["a", "dog", "a"]) == {("a",): 2, ("dog",): 1, ("a", "dog"): 1,
                                                 ("dog", "a"): 1, ("a", "dog", "a"): 1}


def test_cider_d_worked_example():
    scores = M.cider_d(["a dog runs", "A dog sits."], [["a dog runs"], ["a cat sits"]])
    assert scores == pytest.approx([7.5, 1.25])          # 10 * (1 + 1 + 1 + 0) / 4;  10 * 0.5 / 4
    assert sum(scores) / 2 == pytest.approx(4.375)
    # one image: every n-gram occurs in all (1) images, idf = log 1 - log 1 = 0: nothing to match
    assert M.cider_d(["a dog runs"], [["a dog runs"]]) == [0.0]


def test_cider_d_clipping_and_length_penalty():
    refs = [["a dog runs"], ["a cat sits"]]
    # clipping: "dog dog dog" (tf-idf 3L) against "dog" (L) counts min(3L, L) * L, not 3L * L:
    # k = 1 cosine L² / (3L · √2 L) = 1 / (3√2); no shared 2-gram; 10 * that / 4
    clipped = M.cider_d(["dog dog dog", "a cat sits"], refs)[0]
    assert clipped == pytest.approx(10 / 4 / (3 * math.sqrt(2)))
    # length: 5 bigrams against 2, penalty exp(-3² / (2 · 6²)); cosines 2/√10 (k = 1, 2),
    # 1/2 (k = 3)
    expected = 10 / 4 * math.exp(-9 / 72) * (2 / math.sqrt(10) * 2 + 0.5)
    assert M.cider_d(["a dog runs on the grass", "a cat sits"], refs)[0] == pytest.approx(expected)
    # several references: the mean over them
    two = M.cider_d(["a dog runs", "a cat sits"], [["a dog runs", "a cat sits"], ["a bird flies"]])
    one = M.cider_d(["a dog runs", "a cat sits"], [["a dog runs"], ["a bird flies"]])
    assert 0 < two[0] < one[0]


# ---- intervals ----


def test_t_interval_worked_example():
    lo, hi = M.t_interval([0.2, 0.4, 0.6, 0.4, 0.4])     # 0.4 ± 2.7764 · 0.1414 / √5
    assert lo == pytest.approx(0.2244, abs=1e-4) and hi == pytest.approx(0.5756, abs=1e-4)
    assert M.t_interval([0.5]) == (0.0, 1.0)              # one score: nothing known
    assert M.t_interval([0.9, 1.0, 1.0, 0.95], 0.0, 1.0)[1] == 1.0   # clipped to the metric's range


def test_t_quantile_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 5, 30, 31, 50, 100, 1000, 100000):
        assert M.t_quantile_975(df) == pytest.approx(stats.t.ppf(0.975, df), abs=1e-4)


def test_accuracy_summary_wilson_for_0_1_t_for_soft_scores():
    binary = M.accuracy_summary([True] * 8 + [False] * 2)
    assert binary["interval"] == "wilson" and binary["correct"] == 8
    assert binary["ci95"] == pytest.approx(list(M.wilson_interval(8, 10)))
    soft = M.accuracy_summary([0.2, 0.4, 0.6, 0.4, 0.4])
    assert soft["interval"] == "t" and soft["accuracy"] == pytest.approx(0.4)
    assert soft["ci95"] == pytest.approx([0.2244, 0.5756], abs=1e-4)
    assert soft["correct"] == pytest.approx(2.0)
    # CIDEr-D is not capped at 1
    assert M.accuracy_summary([2.0, 6.0, 4.0], high=10.0)["ci95"][1] > 1.0
    # CIDEr-D's 0 and 1: not a proportion
    assert M.accuracy_summary([0.0, 1.0, 1.0], high=10.0)["interval"] == "t"
    assert M.accuracy_summary([])["accuracy"] is None


# ---- one metric per item ----


def item(i, question="what is it?", answer="dog", **extra):
    return {"id": f"q{i}", "image": "x.png", "question": question, "answer": answer, **extra}


def test_pick_metric_auto_by_fields():
    assert M.pick_metric(item(0, metric="vqa", answers=["dog"] * 10)) == "vqa"
    assert M.pick_metric(item(1, question="Which? A. dog B. cat", answer="A")) == "choice"
    assert M.pick_metric(item(2, question="Which? A. dog B. cat", answer="a wolf")) == "exact"
    assert M.pick_metric(item(3)) == "exact"
    assert M.pick_metric(item(4, metric="vqa"), "anls") == "anls"     # --metric overrides the field
    with pytest.raises(ValueError, match="'q5'.*'bleu'"):
        M.pick_metric(item(5, metric="bleu"))


def test_score_items_each_metric():
    items = [item(0, metric="vqa", answers=["2"] * 2 + ["3"] * 8),
             item(1, question="Which? A. dog B. cat C. cow", answer="B"),
             item(2, answer="dog", answers=["dog", "puppy"]),
             item(3, metric="anls", answers=["Smith", "J. Smith"]),
             item(4, metric="relaxed", answers=["12.5"]),
             item(5, question="describe the image.", metric="cider", answers=["a dog runs"]),
             item(6, question="describe the image.", metric="cider", answers=["a cat sits"])]
    predictions = ["Two.", "(B)", "Puppy", "Smiht", "13", "a dog runs", "a dog sits"]
    records = M.score_items(items, predictions)
    kinds = [r["kind"] for r in records]
    assert kinds == ["vqa", "choice", "exact", "anls", "relaxed", "cider", "cider"]
    assert [r["score"] for r in records] == pytest.approx([0.6, 1.0, 1.0, 0.6, 1.0, 7.5, 1.25])
    assert [r["correct"] for r in records] == [False, True, True, False, True, None, None]
    assert records[1]["letter"] == "B" and records[2]["answers"] == ["dog", "puppy"]
    table = M.accuracy_table(records)
    assert table["all"]["accuracy"] == pytest.approx((0.6 + 1 + 1 + 0.6 + 1 + 7.5 + 1.25) / 7)
    assert M.run_scores(records)["metrics"] == {"vqa": 1, "choice": 1, "exact": 1, "anls": 1,
                                                "relaxed": 1, "cider": 2}


def test_check_items_names_the_item_and_field():
    with pytest.raises(ValueError, match="'q0'.*'answers'"):
        M.check_items([item(0, answers="dog")])
    with pytest.raises(ValueError, match="'q1'.*'answers'"):
        M.check_items([item(1, answers=[])])
    with pytest.raises(ValueError, match="'q2'.*choice"):
        M.check_items([item(2)], "choice")
    M.check_items([item(3, metric="vqa", answers=["dog"] * 10)])


# ---- prediction files and evaluate.py --score ----


def test_vlmevalkit_layout_round_trip(tmp_path):
    records = M.score_items([item(0, metric="vqa", answers=["2", "2", "two"], category="count"),
                             {**item(1), "id": "17"}], ["2", "dog"])
    M.write_predictions(tmp_path, records, vlmevalkit=True)
    rows = [json.loads(line) for line in open(tmp_path / "predictions.jsonl")]
    assert rows[0] == {"index": "q0", "question": "what is it?", "answer": "['2', '2', 'two']",
                       "prediction": "2", "category": "count"}
    # an all-digit id is an integer index, as in VLMEvalKit
    assert rows[1]["index"] == 17
    with open(tmp_path / "predictions.tsv", newline="") as f:
        tsv = list(csv.DictReader(f, delimiter="\t"))
    assert list(tsv[0]) == M.VLMEVALKIT_COLUMNS and tsv[0]["answer"] == "['2', '2', 'two']"
    assert M.read_predictions(tmp_path / "predictions.jsonl") == {"q0": "2", "17": "dog"}


def test_read_predictions_errors(tmp_path):
    path = tmp_path / "p.jsonl"
    twice = '{"id": "a", "prediction": "x"}\n{"id": "a", "prediction": "y"}\n'
    for text, message in [('{"id": "a", "prediction": "x"}\nnot json\n', "line 2: not valid JSON"),
                          ('{"id": "a", "answer": "x"}\n', "line 1: expected"),
                          (twice, "'a' is predicted twice")]:
        path.write_text(text)
        with pytest.raises(ValueError, match=message):
            M.read_predictions(path)


def write_items(path, items):
    path.write_text("".join(json.dumps(it) + "\n" for it in items))
    return str(path)


def test_score_files_end_to_end(tmp_path, capsys):
    import evaluate as E
    items = [item(0, metric="vqa", answers=["2"] * 2 + ["3"] * 8, category="a"),
             item(1, metric="vqa", answers=["yes"] * 10, category="b"),
             item(2, metric="anls", answers=["Smith"], category="b")]
    data = write_items(tmp_path / "data.jsonl", items)
    preds = tmp_path / "model_x.jsonl"
    preds.write_text('{"id": "q2", "prediction": "Smiht"}\n{"id": "q0", "prediction": "two"}\n'
                     '{"id": "q1", "prediction": "yes"}\n')   # any order
    flags = ["--score", str(preds), "--data", data, "--out", str(tmp_path / "out")]
    args = E.build_parser().parse_args(flags)
    report = E.evaluate(args)
    run = json.loads((tmp_path / "out" / "report.json").read_text())["runs"][0]
    assert run["name"] == "model_x" and run["metrics"] == {"vqa": 2, "anls": 1}
    assert run["accuracy"]["all"]["accuracy"] == pytest.approx((0.6 + 1.0 + 0.6) / 3)
    assert run["accuracy"]["all"]["interval"] == "t" and run["accuracy"]["b"]["n"] == 2
    assert report["runs"][0]["accuracy"] == run["accuracy"]
    scored = [json.loads(line) for line in open(tmp_path / "out" / "model_x" / "predictions.jsonl")]
    assert [r["id"] for r in scored] == ["q0", "q1", "q2"]
    assert scored[0]["score"] == pytest.approx(0.6)
    assert "evaluated 1 model(s) on 3 items" in capsys.readouterr().out
    assert "| model_x | 73.3 [" in (tmp_path / "out" / "report.md").read_text()
    # --vlmevalkit output reads back to the same scores
    E.evaluate(E.build_parser().parse_args(["--score", str(preds), "--data", data,
                                            "--out", str(tmp_path / "vk"), "--vlmevalkit"]))
    written = tmp_path / "vk" / "model_x" / "predictions.jsonl"
    again = E.evaluate(E.build_parser().parse_args(["--score", str(written), "--data", data,
                                                    "--out", str(tmp_path / "again")]))
    assert again["runs"][0]["name"] == "model_x" and again["runs"][0]["accuracy"] == run["accuracy"]


def test_score_files_clear_errors(tmp_path):
    import evaluate as E
    data = write_items(tmp_path / "data.jsonl", [item(0), item(1)])
    preds = tmp_path / "p.jsonl"
    preds.write_text('{"id": "q0", "prediction": "dog"}\n{"id": "zz", "prediction": "dog"}\n')

    def parse(*flags):
        return E.build_parser().parse_args(["--data", data, "--out", str(tmp_path / "o"), *flags])

    mismatch = r"1 item\(s\) without a prediction \['q1'\].*unknown ids \['zz'\]"
    with pytest.raises(SystemExit, match=mismatch):
        E.evaluate(parse("--score", str(preds)))
    preds.write_text('{"id": "q0", "prediction": "dog"}\n')
    # --limit: the first items only
    assert E.evaluate(parse("--score", str(preds), "--limit", "1"))["items"] == 1
    with pytest.raises(SystemExit, match="--score .*line 1: expected"):
        preds.write_text('{"id": "q0"}\n')
        E.evaluate(parse("--score", str(preds)))
    bad = write_items(tmp_path / "bad.jsonl", [item(0, metric="bleu")])
    with pytest.raises(SystemExit, match="bad.jsonl: item 'q0'"):
        E.evaluate(E.build_parser().parse_args(["--score", str(preds), "--data", bad,
                                                "--out", str(tmp_path / "o")]))
