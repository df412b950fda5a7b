"""Progress bars for every long loop of the package: tqdm's widget bar in a live notebook, its text
bar anywhere else — and the text bar in a headless notebook run (papermill, the suite), where the
widget's comm messages can leave the kernel client waiting after the kernel has finished
(jupyter/nbclient#312). :func:`headless` switches a kernel to text bars, transformers' included.
"""

from __future__ import annotations

from tqdm.auto import tqdm as _auto
from tqdm.std import tqdm as _text

_headless = False


def headless() -> None:
    """Text progress bars from now on in this process, and none from transformers' loaders."""
    global _headless
    _headless = True
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def tqdm(*args, **kwargs):
    """``tqdm.auto.tqdm``, or the text ``tqdm`` after :func:`headless`."""
    return (_text if _headless else _auto)(*args, **kwargs)
