"""Data sets: the generated Shapes world and real VQA data from their published files.

    from microscope.data import load_samples
    samples = load_samples("shapes", n=200, seed=0, handle=h)
    samples = load_samples("gqa", n=200, handle=h, questions="val_balanced_questions.json",
                           images="images/", scene_graphs="val_sceneGraphs.json")
    samples = load_samples("vqa_constraints", handle=h, csvs=["okvqa.csv"], images="coco/")

Every loader yields samples with ``id, image, question, answer, category, constraints`` and
``referred_patches()`` (:class:`~microscope.data.vqa.VQASample` for real data), which is all the
analyses read; notebooks take ``dataset`` and ``dataset_args`` parameters and call this. Real
data sets come back as :class:`~microscope.data.vqa.Samples`: the rows a loader skipped, and
why, are in ``samples.skipped`` (``samples.report()`` as a table).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

DATASETS = ("shapes", "gqa", "scienceqa", "vqa_constraints")


def load_samples(dataset: str = "shapes", n: int | None = None, seed: int = 0, handle=None, **kwargs) -> list:
    """``n`` samples of ``dataset`` (all of a real one when ``n`` is None) drawn with ``seed``.

    ``handle`` sets the Shapes world's image/patch size to the model's and real samples' patch
    grid (for referred patches). ``kwargs`` go to the loader: file paths and options of
    :func:`microscope.data.gqa.load`, :func:`~microscope.data.scienceqa.load`,
    :func:`~microscope.data.vqa_constraints.load` or :func:`~microscope.data.shapes.generate`.
    """
    from microscope.data import gqa, scienceqa, shapes, vqa_constraints
    from microscope.grid import sample_geometry, with_grid

    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; datasets are {list(DATASETS)}")
    if dataset == "shapes":
        if n is None:
            raise ValueError("the Shapes world is generated: give n, the number of samples")
        geometry = sample_geometry(handle) if handle is not None else None
        if geometry is not None:  # draw on the model's image-token grid
            kwargs.setdefault("image_size", geometry[0])
            kwargs.setdefault("patch_size", geometry[1])
        return shapes.generate(n, seed, **kwargs)
    loaders: dict[str, Callable[..., list]] = {"gqa": gqa.load, "scienceqa": scienceqa.load,
                                               "vqa_constraints": vqa_constraints.load}
    loader = loaders[dataset]
    params = inspect.signature(loader).parameters
    required = [p for p, v in params.items() if v.default is inspect.Parameter.empty]
    missing = [p for p in required if p not in kwargs]
    if missing:
        raise ValueError(f"dataset {dataset!r} needs {missing} in dataset_args (the paths of its files); "
                         f"it accepts {list(params)}")
    bad = [k for k in kwargs if k not in params]
    if bad:
        raise ValueError(f"dataset {dataset!r} does not take {bad}; it accepts {list(params)}")
    samples = loader(n=n, seed=seed, **kwargs)
    if not samples:
        why = getattr(samples, "summary", lambda: "")()
        raise ValueError(f"dataset {dataset!r} with {kwargs} gave no samples" + (f":\n{why}" if why else ""))
    return with_grid(samples, handle) if handle is not None else samples
