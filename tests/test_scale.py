"""Loading with a device map, and the real-scale benchmark's code path (shrunk) end to end."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import microscope
from microscope import knockout as ko
from microscope.data import shapes


def test_device_map_loading_gives_the_same_model(shapes_handle):
    h = microscope.load("shapes-llava", device_map={"": "cpu"})
    s = shapes.generate(3, 0)
    a, b = microscope.prepare_samples(h, s), microscope.prepare_samples(shapes_handle, s)
    with torch.no_grad():
        assert torch.equal(h.model(**a.inputs).logits, shapes_handle.model(**b.inputs).logits)
    src, tgt = ko.edge_masks(h, a, "image↛text")
    with ko.knockout(h, [ko.Block(src, tgt, range(6))]), torch.no_grad():
        h.model(**a.inputs)
    with pytest.raises(ValueError, match="either device"):
        microscope.load("shapes-llava", device="cpu", device_map="auto")


def test_scale_benchmark_runs_shrunk():
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "scale_llava7b.py"
    out = subprocess.run([sys.executable, str(script), "--tiny", "--n", "2", "--device", "cpu"], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    for line in ("extraction:", "knockout sweep:", "tracing map:"):
        assert line in out.stdout


def test_unsupported_and_bidirectional_families_are_refused_with_a_reason(tmp_path):
    import json

    from transformers import IdeficsConfig, LlamaConfig, Qwen3VLConfig, ShieldGemma2Config

    from microscope.errors import MicroscopeError

    def complete(d):  # the other files of a checkpoint directory (only config.json is read before refusing)
        for f in ("model.safetensors", "processor_config.json", "tokenizer.json"):
            (d / f).write_text("{}")

    for name, config, message in [("shieldgemma2", ShieldGemma2Config, "'shieldgemma2'.*an image classifier"),
                                  ("idefics", IdeficsConfig, "'idefics'.*gated cross-attention blocks kept outside"),
                                  ("qwen3_vl", Qwen3VLConfig, "'qwen3_vl'.*DeepStack, vision layers"),
                                  ("text", LlamaConfig, "'llama'.*is a text-only model")]:
        d = tmp_path / name
        config().save_pretrained(d)
        complete(d)
        with pytest.raises(MicroscopeError, match=message):
            microscope.load(str(d))
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({**LlamaConfig().to_dict(), "model_type": "vit"}))
    complete(other)
    with pytest.raises(MicroscopeError, match="'vit'.*not an image-text-to-text model transformers knows"):
        microscope.load(str(other))
