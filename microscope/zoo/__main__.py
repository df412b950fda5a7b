"""Command line of the model zoo.

    python -m microscope.zoo train shapes-llava --out DIR [--seed S] [--steps N ...]
    python -m microscope.zoo train shapes-omnifusion --out DIR [--seed S] [--steps N ...]
    python -m microscope.zoo evaluate shapes-llava [--model-dir DIR] --n N --seed S [--card]
    python -m microscope.zoo seeds --seeds 0 1 2 [--work runs/seeds] [--tables DIR]

``train`` runs the training recipe (:mod:`microscope.zoo.training`) and writes the
``save_pretrained`` files, ``training_log.json`` and ``MODEL_CARD.md`` to ``--out``;
``evaluate`` prints the accuracy report (:func:`microscope.zoo.evaluation.evaluate`) as JSON;
``seeds`` trains both fusion styles with each extra seed (seed 0 is the shipped pair, not
retrained; a finished run in ``--work`` is reused), evaluates every seed against the shipped
models' accuracy bar (:data:`microscope.zoo.evaluation.BAR`, ``--eval-n`` fresh samples),
records every seed in the ledger ``seed_runs.csv`` (:func:`microscope.comparison.write_seed_run`)
and writes every seed's geometry profile table (:func:`microscope.comparison.seed_profile`) to
``--tables`` — what ``make seeds`` runs. A seed below the bar is said so and still gets its table:
the comparison's verdicts are over every seed of the recipe, with the verdict over the seeds that
met the bar beside them (:func:`microscope.comparison.verdicts`). The shapes-omnifusion of seed
``k`` takes its CLIP tower from the shapes-llava of seed ``k`` (the same vision stage), so
shapes-llava is trained first.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Callable
from typing import Any

from microscope.errors import MicroscopeError

MODELS = ("shapes-llava", "shapes-omnifusion")


def _recipe_args(p: argparse.ArgumentParser) -> None:
    from microscope.zoo.training import Recipe

    def flag(text: str) -> bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")

    types: dict[str, Callable[[str], Any]] = {"int": int, "float": float, "bool": flag, "str": str}
    for f in dataclasses.fields(Recipe):
        t = types.get(str(f.type))
        if t is not None:
            p.add_argument("--" + f.name.replace("_", "-"), type=t, default=None,
                           help=f"recipe.{f.name} (default {f.default})")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m microscope.zoo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    tr = sub.add_parser("train", help="train a bundled model from scratch")
    tr.add_argument("model", choices=MODELS)
    tr.add_argument("--out", required=True, help="output directory")
    _recipe_args(tr)
    ev = sub.add_parser("evaluate", help="accuracy report as JSON")
    ev.add_argument("model", help="bundled model name or a model directory")
    ev.add_argument("--model-dir", default=None, help="evaluate this directory instead")
    ev.add_argument("--n", type=int, default=2000, help="number of fresh samples")
    ev.add_argument("--seed", type=int, default=7, help="generator seed (< 1000: never trained on)")
    ev.add_argument("--batch", type=int, default=64)
    ev.add_argument("--card", action="store_true",
                    help="also rewrite the model directory's MODEL_CARD.md with this report (needs training_log.json)")
    sd = sub.add_parser("seeds", help="train extra seeds of both styles and write their geometry tables")
    sd.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    sd.add_argument("--styles", nargs="+", default=list(MODELS), choices=MODELS)
    sd.add_argument("--work", default="runs/seeds", help="where the extra seeds' weights are trained")
    sd.add_argument("--tables", default=None, help="table folder (default: the package's seed_profiles)")
    sd.add_argument("--eval-n", type=int, default=2000,
                    help="fresh samples of the accuracy bar every seed must meet (generator seed 7)")
    _recipe_args(sd)  # overrides for experiments; the committed tables use the defaults
    args = ap.parse_args(argv)

    try:
        if args.cmd == "seeds":
            return _seeds(args)
        if args.cmd == "train":
            from microscope.zoo.model_card import write_model_card
            from microscope.zoo.training import Recipe, train

            overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(Recipe)
                         if getattr(args, f.name, None) is not None}
            info = train(args.out, Recipe(**overrides), log=lambda s: print(s, flush=True), style=args.model)
            write_model_card(args.out, info)
            return 0
        from microscope.model import load
        from microscope.zoo.evaluation import evaluate

        if args.n < 6:
            ap.error(f"--n must be at least 6, got {args.n}")
        if args.seed < 0:
            ap.error(f"--seed must be non-negative, got {args.seed}")
        h = load(str(args.model_dir or args.model))
        model, processor = h.model, h.processor
        t = time.time()
        report = evaluate(model, processor, n=args.n, seed=args.seed, batch=args.batch,
                          progress=sys.stderr.isatty())
        report["seconds"] = round(time.time() - t, 1)
        print(json.dumps(report, indent=1))
        if args.card:
            from pathlib import Path

            from microscope.zoo import model_dir
            from microscope.zoo.model_card import write_model_card

            where = model_dir(str(args.model_dir or args.model))
            log_file = Path(where) / "training_log.json"
            if not log_file.is_file():
                print(f"error: --card needs {log_file} (written by train)", file=sys.stderr)
                return 2
            print(f"wrote {write_model_card(where, json.loads(log_file.read_text()), report)}", file=sys.stderr)
        return 0
    except MicroscopeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _seeds(args) -> int:
    from pathlib import Path

    from microscope.comparison import (
        SEED_TABLES,
        pass_rates,
        seed_profile,
        seed_run,
        write_seed_run,
        write_seed_table,
    )
    from microscope.model import load
    from microscope.zoo.evaluation import bar_failures, evaluate
    from microscope.zoo.model_card import write_model_card
    from microscope.zoo.training import Recipe, train

    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(Recipe)
                 if getattr(args, f.name, None) is not None and f.name not in ("seed", "vision_from")}
    command = "python -m microscope.zoo seeds --seeds " + " ".join(map(str, args.seeds)) + \
        " --styles " + " ".join(args.styles) + "".join(f" --{k.replace('_', '-')} {v}" for k, v in overrides.items())
    if args.eval_n != 2000:
        command += f" --eval-n {args.eval_n}"
    work, tables = Path(args.work), Path(args.tables) if args.tables else SEED_TABLES
    runs = None
    for seed in args.seeds:
        for style in sorted(args.styles, key=MODELS.index):  # shapes-llava first: its tower is reused
            seconds = None
            if seed == 0:
                where: str | Path = style
            else:
                where = work / f"{style}-seed{seed}"
                if not (where / "training_log.json").is_file():
                    t = time.time()
                    extra: dict[str, Any] = {"vision_from": str(work / f"shapes-llava-seed{seed}")} \
                        if style == "shapes-omnifusion" else {}
                    info = train(where, Recipe(seed=seed, **overrides, **extra), log=lambda s: print(s, flush=True),
                                 style=style)
                    write_model_card(where, info)
                    print(f"[seeds] {style} seed {seed} trained in {time.time() - t:.0f}s", flush=True)
                seconds = json.loads((where / "training_log.json").read_text())["seconds"]["total"]
            h = load(str(where))
            # the shipped models' accuracy bar, on the same fresh samples as their cards: recorded for every seed
            report = evaluate(h.model, h.processor, n=args.eval_n, seed=7, progress=False)
            failures = bar_failures(report)
            if seed != 0:
                write_model_card(where, json.loads((Path(where) / "training_log.json").read_text()), report)
            runs = write_seed_run(seed_run(style, seed, report, failures, seconds), tables / "seed_runs.csv")
            if failures:
                print(f"[seeds] {style} seed {seed} misses the accuracy bar ({'; '.join(failures)}): recorded in "
                      f"{tables / 'seed_runs.csv'}; its geometry table is written all the same", flush=True)
            df = seed_profile(h, style, seed)
            path = write_seed_table(df, tables, command)
            print(f"[seeds] {style} seed {seed} (overall {report['overall']:.3f}): {len(df)} rows -> {path}",
                  flush=True)
    if runs is not None:
        print(pass_rates(runs).to_string(index=False), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
