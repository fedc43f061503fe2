"""The report of evaluate.py (paper §7, §8, App. B eq. 23, as tables): report.json, report.md and
the one-line summary; and the same report for the prediction files of any model (--score).

evaluate.py measures each model and hands its run reports to write_report and summary_line.
score_files scores prediction files written by any model (one {"id", "prediction"} object a line,
or VLMEvalKit's columns) against --data with each benchmark's own metric (metrics.py), without
loading a model or opening an image; each file is a run of the same report. report.md has one row
per model (with --attn: its own maps, a row per Lavender run's Aligner head and one for the DM
maps), one column per measure, and the accuracy per category below.

    python evaluate.py --score other_model.jsonl --data textvqa.jsonl --out eval/other
"""
import json
from pathlib import Path

import data
from metrics import (check_items, describe_metric, read_predictions, run_scores, score_items,
                     write_predictions)

# ---------------------------------------------------------------------------------------------
# scoring the predictions of any model (--score)
# ---------------------------------------------------------------------------------------------

def read_scored_items(args):
    """The --data items (the first --limit), checked against the metric before any model runs."""
    items = data.read_items_or_exit(args.data)[:args.limit or None]
    try:
        check_items(items, args.metric)
    except ValueError as err:
        raise SystemExit(f"--data {args.data}: {err}") from None
    return items


def unique_names(names):
    """The names made unique: one that occurs more than once gets -<its position> added.
    ["ar", "ar", "lavender"] -> ["ar-0", "ar-1", "lavender"]."""
    return [n if names.count(n) == 1 else f"{n}-{i}" for i, n in enumerate(names)]


def score_files(args):
    """--score: the report for prediction files made by any model, scored against --data; no model
    is loaded and no image opened. Each file is a run, named by its folder when it is called
    predictions.jsonl (a run folder of an earlier report), else by its file name."""
    out_dir = Path(args.out)
    items = read_scored_items(args)
    known = {it["id"] for it in data.read_items_or_exit(args.data)}
    names = [Path(p).parent.name if Path(p).name == "predictions.jsonl" else Path(p).stem
             for p in args.score]
    names = unique_names(names)
    runs = []
    for i, path in enumerate(args.score):
        try:
            predictions = read_predictions(path)
        # missing, not UTF-8, not JSON, a line without fields
        except (OSError, ValueError) as err:
            raise SystemExit(f"--score {err}") from None
        unknown = [k for k in predictions if k not in known]
        missing = [it["id"] for it in items if it["id"] not in predictions]
        if unknown or missing:
            raise SystemExit(f"--score {path} does not match --data {args.data}: {len(missing)} "
                             f"item(s) without a prediction {missing[:5]}, {len(unknown)} "
                             f"prediction(s) for unknown ids {unknown[:5]}")
        answers = [predictions[it["id"]] for it in items]
        records = score_items(items, answers, args.metric, args.vqa_rule)
        write_predictions(out_dir / names[i], records, args.vlmevalkit)
        runs.append({"name": names[i], "predictions": str(path), **run_scores(records)})
    report = {"data": str(args.data), "items": len(items), "out": str(out_dir),
              "metric": describe_metric(args.metric, args.vqa_rule), "runs": runs, "figures": []}
    write_report(report, out_dir)
    print(summary_line(report))
    return report


# ---------------------------------------------------------------------------------------------
# report files
# ---------------------------------------------------------------------------------------------

def _pct(summary):
    """An accuracy summary in %, '-' without one: 8 of 10 -> '80.0 [49.0, 94.3] (n=10)'."""
    if not summary or summary["accuracy"] is None:
        return "-"
    lo, hi = summary["ci95"]
    return f"{100 * summary['accuracy']:.1f} [{100 * lo:.1f}, {100 * hi:.1f}] (n={summary['n']})"


def _num(summary, digits=3):
    """A summary's mean with `digits` decimals, '-' without one."""
    return "-" if not summary or summary.get("mean") is None else f"{summary['mean']:.{digits}f}"


def attention_rows(report):
    """The main table's rows with attention measures: each model's own maps, each Lavender run's
    Aligner head, the DM's maps of the same words."""
    rows = []
    for r in report["runs"]:
        accuracy = _pct(r["accuracy"]["all"])
        rows.append(f"| {r['name']} | own | {accuracy} | {_num(r.get('vlm_entropy'))} | "
                    f"{_num(r.get('alignment_mse'), 4)} | {r.get('matched_words', '-')} | "
                    f"{_pct(r.get('pointing'))} |")
    for r in report["runs"]:
        head = r.get("head")
        if head:
            rows.append(f"| {r['name']} | head | | {_num(head['entropy'])} | "
                        f"{_num(head['alignment_mse'], 4)} | {head['matched_words']} | "
                        f"{_pct(head['pointing'])} |")
    dm = report.get("dm") or {}
    if dm:
        rows.append(f"| DM (the target) | | | {_num(dm.get('entropy'))} | | "
                    f"{dm.get('matched_words', '-')} | {_pct(dm.get('pointing'))} |")
    return rows


def report_markdown(report):
    """report.md: one row per model (with --attn: its own attention, and a row per Lavender run's
    Aligner head), one column per measure; per-category accuracy below when present."""
    runs = report["runs"]
    lines = [f"# Evaluation on {report['data']} ({report['items']} items)", "",
             f"Accuracy: {report.get('metric')}; in % (CIDEr-D x 100, as papers print it).", ""]
    if any(r.get("vlm_entropy") for r in runs):
        note = ("Attention columns, per answer word with a DM map: 'own' is each model's own "
                "cross-attention, read the same way for every model; 'head' is a Lavender run's "
                "map through its Aligner (what its loss compares). Entropy: App. B eq. 23, nats "
                "(uniform 32x32 = 6.931). MSE: against the DM map. Pointing: the map's argmax "
                "inside the named object.")
        header = ("| model | maps | accuracy % [95% CI] | entropy | alignment MSE | "
                  "matched words | pointing % [95% CI] |")
        lines[-1:] = [note, "", header, "|---|---|---|---|---|---|---|", *attention_rows(report)]
    else:
        # no attention measured (no --attn, or --score): accuracy alone
        rows = [f"| {r['name']} | {_pct(r['accuracy']['all'])} |" for r in runs]
        lines += ["| model | accuracy % [95% CI] |", "|---|---|", *rows]
    categories = sorted({c for r in runs for c in r["accuracy"] if c != "all"})
    if categories:
        lines += ["", "## Accuracy per category", "", "| run | " + " | ".join(categories) + " |",
                  "|---|" + "---|" * len(categories)]
        for r in runs:
            cells = " | ".join(_pct(r["accuracy"].get(c)) for c in categories)
            lines.append(f"| {r['name']} | " + cells + " |")
    if report.get("figures"):
        lines += ["", "## Figures", ""] + [f"- {f}" for f in report["figures"]]
    return "\n".join(lines) + "\n"


def write_report(report, out_dir):
    """report.json (every figure) and report.md (the table) under out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out_dir / "report.md").write_text(report_markdown(report))


def summary_line(report):
    """One line: each model's accuracy [95% CI] (and alignment MSE when measured), and where the
    report is."""
    parts = []
    for r in report["runs"]:
        # the accuracy and its interval, without the count
        accuracy = _pct(r["accuracy"]["all"]).split(" (")[0]
        part = f"{r['name']} {accuracy}%"
        mse = r.get("alignment_mse") or {}
        if mse.get("mean") is not None:
            part += f" mse {mse['mean']:.4f}"
        if "items_per_second" in r:
            part += f" {r['items_per_second']:.2f} items/s"
        parts.append(part)
    every = "; ".join(parts)
    return (f"evaluated {len(report['runs'])} model(s) on {report['items']} items: {every} "
            f"-> {report['out']}/report.md")
