"""Command line of the model zoo.

    python -m microscope.zoo train shapes-llava --out DIR [--seed S] [--steps N ...]
    python -m microscope.zoo train shapes-omnifusion --out DIR [--seed S] [--steps N ...]
    python -m microscope.zoo evaluate shapes-llava [--model-dir DIR] --n N --seed S

``train`` runs the training recipe (:mod:`microscope.zoo.training`) and writes the
``save_pretrained`` files, ``training_log.json`` and ``MODEL_CARD.md`` to ``--out``;
``evaluate`` prints the accuracy report (:func:`microscope.zoo.evaluation.evaluate`) as JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

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

    types = {"int": int, "float": float, "bool": flag, "str": str}
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
    args = ap.parse_args(argv)

    try:
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
        return 0
    except MicroscopeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
