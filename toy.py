"""The one-command demo of the whole method on the miniature world (not in the paper; it runs
§4-§8 end to end in minutes on a CPU), the demo's report, and the command line of every step in the
miniature world: the world, the base models, the demo and the protocol (toy_protocol.py).

No weights can be downloaded here, so the project draws its own world (world.py) and trains its
own "pretrained" models on it (toy_teachers.py: toy-sd; base_models.py: the toy VLM; shipped
in toy_models/); then every step of the paper runs on it for real, through the real scripts:

  1. `python toy.py`: extract DM maps (extract.py), fine-tune AR, Lavender and the oracle (the
     world's object masks as targets, world.oracle_store) with the same budget and seeds
     (train.py), evaluate (evaluate.py) and measure the attention ceiling (base_models.py); print
     one table, write toy_out/toy_report.md and .json (`--report toy_report.md`: the shipped
     report).
  2. `python toy.py protocol`: every arm over several worlds and seeds, paired against AR of the
     same world and seed, with the oracle and the controls (toy_protocol.py: protocol.json,
     protocol.md).

    python toy.py                     # the demo (weights in toy_models/, world cached in toy_out/)
    python toy.py protocol            # every arm x --worlds x --seeds
    python toy.py build               # draw the world only (world.py)
    python toy.py train-sd --seed 0   # retrain toy_models/toy-sd (1500 steps of 16, 12 min, 1 core)
    python toy.py train-vlm --seed 0  # retrain toy_models/toy-vlm
    python toy.py measure-sd          # toy-sd pointing on held-out images, colour and cell apart
"""
import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch

import base_models
import data
import extract
import mmdit
import models
import toy_teachers
import world
from metrics import mean_spread, paired, paired_cell
from toy_protocol import (DATA_SIZES, MEASURES, ORACLE_ARMS, ROOT, as_run, evaluate_runs,
                          finetune, in_parallel, prepare_world, protocol)

TOY_MODELS = ROOT / "toy_models"

# ---------------------------------------------------------------------------------------------
# the demo: extract -> fine-tune AR and Lavender -> evaluate, every stage through the real scripts
# (toy_protocol.py's stages, which the protocol runs too)
# ---------------------------------------------------------------------------------------------

DEMO_MODELS = ("base", "ar", "lavender", "oracle")  # the demo's columns


def runs_of(reports, split, kind):
    """The run reports of one model kind ("ar": "ar-s0", "ar-s1", ...) in evaluate.py's
    {split: report}."""
    runs = reports[split]["runs"]
    return [r for r in runs if r["name"] == kind or r["name"].startswith(kind + "-s")]


def demo_table(reports, seeds):
    """Rows of the demo table from evaluate.py's reports {split: report}: one column per model
    kind."""
    def column(kind, pick, split="test-id"):
        return [pick(r) for r in runs_of(reports, split, kind)]

    def spreads(pick, split="test-id", kinds=DEMO_MODELS):
        # one 'mean ± std' cell per model kind
        return [mean_spread(column(k, pick, split)) for k in kinds]

    def head(pick):
        # the same measure of a Lavender run's Aligner head
        return lambda r: pick(as_run(r["head"])) if r.get("head") else None

    names = ("accuracy test-id", "own entropy test-id", "own pointing test-id",
             "own MSE to DM test-id")
    acc, ent, point, mse = (MEASURES[m][1] for m in names)
    blank = [""] * (len(DEMO_MODELS) - 2)
    rows = []
    for split in ("test-id", "test-ood"):
        rows.append((f"accuracy {split}", *spreads(acc, split)))
    # one row per question kind, where the world asks several
    kinds = world.KINDS if len(world.KINDS) > 1 else ()
    for split in ("test-id", "test-ood"):
        for k in kinds:
            pick = lambda r, k=k: (r["accuracy"].get(k) or {}).get("accuracy")  # noqa: E731
            rows.append((f"  {k} ({split})", *spreads(pick, split)))
    gaps = demo_paired(reports)
    for split in ("test-id", "test-ood"):
        cells = [paired_cell(gaps[arm][split]) for arm in DEMO_MODELS[2:]]
        rows.append((f"  minus AR, paired by seed [95% t] ({split})", "", "", *cells))
    dm = reports["test-id"].get("dm") or {}
    rows.append(("VLM's own attention: entropy (nats, test-id)", *spreads(ent)))
    rows.append(("VLM's own attention: pointing (test-id)", *spreads(point)))
    rows.append(("VLM's own attention: MSE to the DM map (test-id)", *spreads(mse)))
    for name, pick in (("entropy", ent), ("pointing", point), ("MSE to the DM map", mse)):
        heads = spreads(head(pick), kinds=DEMO_MODELS[2:])
        rows.append((f"Aligner head: {name} (test-id)", "", "", *heads))
    dm_cell = "-"
    if dm.get("pointing"):
        dm_cell = f"{dm['entropy']['mean']:.3f}, {dm['pointing']['accuracy']:.3f}"
    rows.append(("DM maps of the same words: entropy, pointing (test-id)", dm_cell, "", *blank))
    return rows


def demo_paired(reports):
    """{arm: {split: paired(...)}}: each model kind after AR minus AR of the same seed, accuracy."""
    acc = MEASURES["accuracy test-id"][1]
    gaps = {}
    for arm in DEMO_MODELS[2:]:
        for split in ("test-id", "test-ood"):
            # {seed: {arm: accuracy, "ar": accuracy}}
            runs = runs_of(reports, split, arm)
            by_seed = {r["name"].rsplit("-s", 1)[1]: {arm: acc(r)} for r in runs}
            for r in runs_of(reports, split, "ar"):
                by_seed.get(r["name"].rsplit("-s", 1)[1], {})["ar"] = acc(r)
            gaps.setdefault(arm, {})[split] = paired(list(by_seed.values()), arm)
    return gaps


def mean_or_none(xs):
    """float(np.mean(xs)), or None where xs is empty or lacks a value."""
    return float(np.mean(xs)) if xs and None not in xs else None


def demo_json(reports, perception):
    """toy_report.json: the demo's figures by key, means over seeds (forks compare runs with it)."""
    pick = {name: MEASURES[name][1] for name in MEASURES}
    dm = reports["test-id"].get("dm") or {}
    base = {s: runs_of(reports, s, "base")[0] for s in ("test-id", "test-ood")}
    result = {"dm_pointing": (dm.get("pointing") or {}).get("accuracy"),
              "dm_entropy": (dm.get("entropy") or {}).get("mean"),
              "base_own_entropy": pick["own entropy test-id"](base["test-id"]),
              "base_accuracy": {s: pick["accuracy test-id"](r) for s, r in base.items()},
              "base_accuracy_one_object": perception}
    for arm in DEMO_MODELS[1:]:
        result[arm] = demo_arm_json(reports, arm)
    # minus AR of the same seed, accuracy
    for arm, gaps in demo_paired(reports).items():
        result[arm]["minus_ar"] = {s: gap and {k: gap[k] for k in ("mean", "low", "high", "n")}
                                   for s, gap in gaps.items()}
    return result


def demo_arm_json(reports, arm):
    """One model kind's figures in toy_report.json, means over its seeds: accuracy (all and by
    question kind) on test-id and test-ood, own pointing and entropy on test-id."""
    runs = {s: runs_of(reports, s, arm) for s in ("test-id", "test-ood")}
    accuracy = MEASURES["accuracy test-id"][1]
    pointing = MEASURES["own pointing test-id"][1]
    entropy = MEASURES["own entropy test-id"][1]

    def kind_accuracy(split, kind):
        return mean_or_none([(r["accuracy"].get(kind) or {}).get("accuracy") for r in runs[split]])

    return {"accuracy": {s: mean_or_none([accuracy(r) for r in runs[s]]) for s in runs},
            "accuracy_by_kind": {s: {k: kind_accuracy(s, k) for k in world.KINDS} for s in runs},
            "own_pointing": mean_or_none([pointing(r) for r in runs["test-id"]]),
            "own_entropy": mean_or_none([entropy(r) for r in runs["test-id"]]),
            "seeds": len(runs["test-id"])}


def markdown_table(rows, header=("measure", "base (toy)", "AR", "Lavender",
                                 "oracle (masks, read path)")):
    """The rows as a markdown table under `header`."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    body = ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    return "\n".join(lines + body)


def demo(args):
    """The README's main command: the whole method on the miniature world; returns the table
    rows."""
    t0 = time.time()
    out = Path(args.out or ROOT / "toy_out")

    def stage(text):
        print(f"[toy {time.time() - t0:5.0f}s] {text}", flush=True)

    paths, attn = prepare_world(args, args.seed, args.world, out, stage)
    runs = demo_runs(args, paths, attn, out, stage)
    reports = evaluate_runs(args, paths, attn, runs, out, stage)
    perception, ceiling = base_model_checks(args, paths, stage)
    # ---- one table, toy_report.md and toy_report.json ----
    minutes = (time.time() - t0) / 60
    steered = f"{ceiling['test-id'][1.0]:.3f}, {ceiling['test-ood'][1.0]:.3f}"
    ceiling_row = ("base, cross-attention steered to the object: accuracy test-id, test-ood",
                   steered, "", "", "")
    rows = demo_table(reports, args.seeds) + [ceiling_row]
    table = markdown_table(rows)
    print("\n" + table + f"\n\nwall time {minutes:.1f} min; seeds {args.seeds}; {args.steps} "
          f"steps of batch {args.batch_size} per run; reports in {out}/eval-*/report.md")
    # --report '': no report
    report = out / "toy_report.md" if args.report is None else args.report
    if report:
        write_report(Path(report), table, reports, args, minutes, out)
        ceilings = {s: {"as_is": c[0.0], "steered": c[1.0]} for s, c in ceiling.items()}
        figures = dict(demo_json(reports, perception), minutes=round(minutes, 2),
                       seeds=args.seeds, attention_ceiling=ceilings)
        figures_path = Path(report).with_suffix(".json")
        figures_path.write_text(json.dumps(figures, indent=1) + "\n")
        stage(f"wrote {report} and {figures_path}")
    return rows


def demo_runs(args, paths, attn, out, stage):
    """The demo's fine-tuning runs, AR, Lavender (the DM's maps) and the oracle (the world's masks,
    ORACLE_ARMS' read path), with the same budget, data and seeds; their run dirs."""
    arms = (("ar", "ar", attn["finetune"]), ("lavender", "lavender", attn["finetune"]),
            ("oracle", "lavender", attn["oracle"]))
    calls = []
    for seed in args.seeds:
        for arm, loss, targets in arms:
            run_dir = out / "runs" / f"{arm}-s{seed}"
            overrides = ORACLE_ARMS.get(arm)
            calls.append((args, paths["finetune"], targets, run_dir, loss, seed, overrides))
    stage(f"fine-tune AR, Lavender and the oracle, seeds {args.seeds}: {len(calls)} runs of "
          f"{args.steps} steps of {args.batch_size} ({args.threads} processes)")
    return in_parallel(args, finetune, calls)


def base_model_checks(args, paths, stage):
    """The base toy VLM alone: its accuracy by question kind on one-object images (test-one:
    perception) and the attention ceiling on test-id and test-ood (base_models.attention_ceiling:
    its cross-attention steered to the asked object). Returns (perception, {split: ceiling})."""
    stage("perception: the base model on one-object images (test-one)")
    model, processor = models.load_vlm("toy", path=args.vlm_path)[:2]
    one_object = data.read_items(paths["test-one"])
    perception = base_models.kind_accuracy(model.eval(), processor, one_object)
    stage("the attention ceiling: the base model with its cross-attention steered to the asked "
          "object")
    tests = {s: data.read_items(paths[s])[:args.limit or None] for s in ("test-id", "test-ood")}
    ceiling = {s: base_models.attention_ceiling(model, processor, items)
               for s, items in tests.items()}
    return perception, ceiling


def relative(v):
    """A path inside the repository as the README's commands write it (relative to ROOT); other
    values as they are, a Path as its string."""
    is_path = isinstance(v, (str, Path)) and Path(v).is_absolute()
    if is_path and Path(v).resolve().is_relative_to(ROOT):
        return str(Path(v).resolve().relative_to(ROOT))
    return str(v) if isinstance(v, Path) else v


def write_report(path, table, reports, args, minutes, out):
    """toy_report.md with the table and the pictures (copied beside it, into toy_report/)."""
    pictures = path.parent / "toy_report"
    pictures.mkdir(parents=True, exist_ok=True)
    shown = []
    for split in ("test-id", "test-ood"):
        for fig in reports[split]["figures"][:3]:
            name = f"{split}-{Path(fig).name}"
            shutil.copy(out / f"eval-{split}" / fig, pictures / name)
            shown.append(f"![{split} {fig}](toy_report/{name})")
    recorded = {k: relative(v) for k, v in vars(args).items()}
    # hand-written notes below the marker (what was tried, by hand) survive a re-run of the demo
    marker = "<!-- notes: kept when the demo rewrites this file -->"
    notes = "\n"
    if path.exists() and marker in path.read_text():
        notes = path.read_text().split(marker, 1)[1]
    intro = (
        "# The miniature world: Lavender vs autoregressive fine-tuning\n\n"
        f"Made by `python toy.py --report {relative(path.resolve())}` ({minutes:.1f} min on this "
        f"machine; finished runs of the same settings in {relative(out)}/runs are reused, not "
        f"retrained). Mean ± sample std over seeds {args.seeds}; accuracy is exact match. The "
        "VLM's own attention is read the same way for every model: its pretrained cross-attention, "
        "averaged over heads and layers (evaluate.py's mean-mean), no Aligner, min-max normalised "
        "like the DM maps; a Lavender run's Aligner head (the map its loss trains to imitate the "
        "DM's) has rows of its own. Entropy: App. B eq. 23 (uniform 32x32 = 6.93 nats); pointing: "
        "the argmax of an answer word's map inside the object it names; MSE: against the DM map "
        "of the same word. Base = the pre-trained toy VLM before fine-tuning.\n\n")
    pictures_text = (
        "Pictures (evaluate.py): entropy histograms (Fig. 7), and per item the image, the DM map "
        "and each model's map of the answer word (Fig. 8/17).\n\n")
    settings_text = f"Settings: `{json.dumps(recorded)}`\n\n"
    path.write_text(intro + table + "\n\n" + pictures_text + "\n\n".join(shown) + "\n\n"
                    + settings_text + marker + notes)


# ---------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------

def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", nargs="?", default="demo",
                   choices=("demo", "protocol", "build", "train-sd", "train-vlm", "measure-sd"),
                   help="demo (default): the whole method end to end; build: draw the world only; "
                        "protocol: every arm over --worlds x --seeds, paired against AR; "
                        "train-sd, train-vlm: retrain the base models; measure-sd: pointing")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the world and of the base models' training")
    p.add_argument("--world", default=str(ROOT / "toy_out" / "world"),
                   help="where the world is drawn (a cache)")
    p.add_argument("--out", default=None,
                   help="output (demo: toy_out; train-sd: toy_models/DM; "
                        "train-vlm: toy_models/toy-vlm; measure-sd: toy_out/measure-sd)")
    p.add_argument("--threads", type=int, default=2,
                   help="CPU cores: the demo and the protocol run their extractions, fine-tuning "
                        "runs and evaluations on this many processes of one thread each (1: in "
                        "this process); train-sd, train-vlm and measure-sd use this many torch "
                        "threads")
    # ---- base models ----
    p.add_argument("--dm", default="toy-sd", choices=("toy-sd", *toy_teachers.SIZES),
                   help="the teacher: toy-sd, or toy_teachers.py's toy-sd21, toy-sdxl, toy-sd3")
    p.add_argument("--dm-path", default=None, help="its folder (default toy_models/<--dm>)")
    p.add_argument("--vlm-path", default=str(TOY_MODELS / "toy-vlm"),
                   help="toy VLM folder (save_pretrained)")
    p.add_argument("--base-steps", type=int, default=None,
                   help="train-sd / train-vlm: training steps (1500 / 1000)")
    p.add_argument("--init-from", default=None, help="train-sd (toy-sd): continue from this folder")
    p.add_argument("--sd-lr", type=float, default=1e-3,
                   help="train-sd: peak learning rate (warm-up + cosine)")
    p.add_argument("--save-every", type=int, default=300, help="train-sd (toy-sd): step<N>/ each N")
    p.add_argument("--localise", type=float, default=toy_teachers.LOCALISE,
                   help="train-sd: the localisation loss's weight (0: taught by denoising alone)")
    # ---- extraction (extract.py) ----
    p.add_argument("--inversion-steps", type=int, default=5,
                   help="DDIM inversion steps (extract.py)")
    p.add_argument("--denoise-steps", type=int, default=5,
                   help="denoising steps after the inversion (extract.py)")
    p.add_argument("--capture-steps", default="denoise", choices=("denoise", "inversion", "all"),
                   help="steps whose cross-attention is averaged (extract.py)")
    p.add_argument("--dit-map", default="joint", choices=mmdit.DIT_MAPS,
                   help="toy-sd3's map: its joint attention or the output space (extract.py)")
    # ---- fine-tuning (train.py): the same for AR and Lavender ----
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                   help="fine-tuning seeds (each runs AR and Lavender)")
    p.add_argument("--worlds", type=int, nargs="+", default=[0, 1, 2],
                   help="protocol: the world seeds")
    p.add_argument("--follow-ups", action=argparse.BooleanOptionalAction, default=False,
                   help="protocol: also the FOLLOW_UPS arms (chosen after the first results, "
                        "reported as such)")
    p.add_argument("--arms", nargs="+", default=None,
                   help="protocol: only these arms of ARMS and FOLLOW_UPS (AR, the default "
                        "Lavender, ORACLE_ARMS and CONTROL_ARMS always run)")
    p.add_argument("--data-sizes", type=int, nargs="*", default=DATA_SIZES,
                   help="protocol: smaller finetune splits, AR and Lavender each (none: "
                        "--data-sizes alone)")
    p.add_argument("--finetune-items", type=int, default=None,
                   help="the finetune split's size (default 100; another size: another --world)")
    p.add_argument("--steps", type=int, default=150, help="optimizer steps per fine-tuning run")
    p.add_argument("--batch-size", type=int, default=8, help="fine-tuning batch size")
    p.add_argument("--lr", type=float, default=1e-3, help="fine-tuning learning rate")
    p.add_argument("--peft", default="lora", choices=("lora", "full"),
                   help="LoRA (paper) or full fine-tuning")
    p.add_argument("--lam", type=float, default=10.0, help="λ of eq. 10")
    p.add_argument("--aggregate", default="learn",
                   help="train.py --aggregate (learn, mean-mean, ...)")
    p.add_argument("--aligner", default="sim",
                   help="train.py --aligner (sim, light, deep, mlp, none)")
    p.add_argument("--aligner-mode", default="auto",
                   help="train.py --aligner-mode (auto, per-layer, after)")
    p.add_argument("--align-words", default="predicted",
                   help="train.py --align-words (predicted, label)")
    p.add_argument("--att-pooling", default="words", choices=("words", "samples"),
                   help="train.py's")
    p.add_argument("--pretrain-aligner-steps", type=int, default=0,
                   help="Lavender runs: Aligner pre-training steps")
    # ---- demo output ----
    p.add_argument("--limit", type=int, default=0,
                   help="extract and evaluate only the first N items of each split (quick test; "
                        "0: all)")
    p.add_argument("--report", default=None,
                   help="where the demo writes its report and pictures (default "
                        "<out>/toy_report.md; toy_report.md refreshes the shipped one and "
                        "toy_report/; '' for none)")
    p.add_argument("--quiet", action=argparse.BooleanOptionalAction, default=False,
                   help="no progress bars")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    args.dm_path = args.dm_path or models.preset_path(args.dm)
    extract.check_dit_map(args.dit_map, args.dm, models.PRESETS[args.dm].get("family") == "mmdit")
    data.library_bars(not args.quiet)
    torch.set_num_threads(args.threads)
    if args.command == "build":
        paths = world.build_world(args.world, args.seed)
        print(f"world: {', '.join(f'{k}={v}' for k, v in paths.items())}")
    elif args.command == "train-sd" and args.dm != "toy-sd":
        out = args.out or TOY_MODELS / args.dm
        steps = args.base_steps or 1500
        toy_teachers.train(args.dm, out, args.world, args.seed, steps, args.sd_lr, args.init_from,
                           localise=args.localise, show=not args.quiet)
    elif args.command == "train-sd":
        out = args.out or TOY_MODELS / "toy-sd"
        toy_teachers.train_sd(out, args.world, seed=args.seed, steps=args.base_steps or 1500,
                              lr=args.sd_lr, save_every=args.save_every, init_from=args.init_from,
                              localise=args.localise, show=not args.quiet)
    elif args.command == "train-vlm":
        out = args.out or TOY_MODELS / "toy-vlm"
        base_models.train_vlm(out, args.world, seed=args.seed, steps=args.base_steps or 1000,
                              show=not args.quiet)
    elif args.command == "measure-sd":
        out = args.out or ROOT / "toy_out" / "measure-sd"
        result = base_models.measure_sd(args.dm_path, args.world, out, seed=args.seed,
                                        name=args.dm, inversion_steps=args.inversion_steps,
                                        denoise_steps=args.denoise_steps,
                                        capture_steps=args.capture_steps, dit_map=args.dit_map)
        print(f"{args.dm} pointing: {json.dumps(result)}")
    elif args.command == "protocol":
        return protocol(args)
    else:
        return demo(args)


if __name__ == "__main__":
    main()
