"""microscope.load on checkpoints as researchers bring them: sharded safetensors, Qwen's release
layout, every chat-template form, pickle weights (opt-in), hub-cache snapshots by id, and one
clear error — naming the user's model, never the bundled one — for each way a load goes wrong."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlavaForConditionalGeneration

import microscope
import microscope.zoo
from microscope.data import shapes
from microscope.errors import MicroscopeError, ModelNotFoundError
from microscope.roles import build_prompt
from tests.tiny_models import build_llava15, build_qwen2_vl

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".index.json")
pytestmark = pytest.mark.filterwarnings("ignore:torchvision is not installed")


def _copy(src: Path, dst: Path, weights: bool = True) -> Path:
    """A copy of checkpoint ``src``; without its weight files unless ``weights``."""
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if weights or not f.name.endswith(WEIGHT_SUFFIXES):
            shutil.copy(f, dst / f.name)
    return dst


def _logits(h) -> torch.Tensor:
    b = microscope.prepare_samples(h, shapes.generate(2, seed=3))
    with torch.no_grad():
        return h.model(**b.inputs).logits


def _assert_user_error(msg: str, path: Path) -> None:
    """An error about a user's model names it and its own fix, never the bundled model's."""
    assert str(path) in msg, msg
    assert "shapes-llava" not in msg and "zoo train" not in msg, msg
    assert "save_pretrained" in msg or "hf download" in msg, msg


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    """A tiny LLaVA-1.5 with its weights in one ``model.safetensors`` (the builders save sharded)."""
    built = build_llava15(tmp_path_factory.mktemp("load") / "built")
    path = _copy(built, tmp_path_factory.mktemp("load") / "single", weights=False)
    LlavaForConditionalGeneration.from_pretrained(built).save_pretrained(path, max_shard_size="10GB")
    assert (path / "model.safetensors").is_file()
    return path


@pytest.fixture(scope="module")
def single_logits(single) -> torch.Tensor:
    return _logits(microscope.load(str(single)))


@pytest.fixture(scope="module")
def sharded(single, tmp_path_factory) -> Path:
    """The same checkpoint re-saved in ~200 kB shards with model.safetensors.index.json."""
    path = _copy(single, tmp_path_factory.mktemp("load") / "sharded", weights=False)
    LlavaForConditionalGeneration.from_pretrained(single).save_pretrained(path, max_shard_size="200KB")
    return path


def _shards(path: Path) -> list[str]:
    return sorted(set(json.loads((path / "model.safetensors.index.json").read_text())["weight_map"].values()))


def test_sharded_checkpoint_loads_with_the_same_logits(sharded, single_logits):
    assert not (sharded / "model.safetensors").exists() and len(_shards(sharded)) >= 2
    h = microscope.load(str(sharded))
    assert torch.equal(_logits(h), single_logits)


def test_missing_or_broken_shard_is_named(sharded, tmp_path):
    shards = _shards(sharded)
    gone = _copy(sharded, tmp_path / "gone")
    (gone / shards[1]).unlink()
    with pytest.raises(ModelNotFoundError, match=f"missing {shards[1]}") as e:
        microscope.load(str(gone))
    _assert_user_error(str(e.value), gone)

    cut = _copy(sharded, tmp_path / "cut")
    data = (cut / shards[0]).read_bytes()
    (cut / shards[0]).write_bytes(data[: len(data) - 100])
    with pytest.raises(ModelNotFoundError, match=f"{shards[0]} is truncated or corrupt") as e:
        microscope.load(str(cut))
    _assert_user_error(str(e.value), cut)

    no_index = _copy(sharded, tmp_path / "no_index")
    (no_index / "model.safetensors.index.json").unlink()
    with pytest.raises(ModelNotFoundError, match=f"no weights.*found only {shards[0]}") as e:
        microscope.load(str(no_index))
    _assert_user_error(str(e.value), no_index)

    bad_index = _copy(sharded, tmp_path / "bad_index")
    (bad_index / "model.safetensors.index.json").write_text('{"metadata": {}}')
    with pytest.raises(ModelNotFoundError, match="model.safetensors.index.json is not a valid index") as e:
        microscope.load(str(bad_index))
    _assert_user_error(str(e.value), bad_index)


def _fake_hub_cache(cache: Path, repo_id: str, src: Path) -> Path:
    """``src`` as huggingface_hub caches a download: blobs by hash, a snapshot of symlinks to them,
    refs/main naming the snapshot."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    for f in src.iterdir():
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copy(f, repo / "blobs" / digest)
        (snap / f.name).symlink_to(Path("..", "..", "blobs", digest))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return snap


@pytest.mark.parametrize("env", ["HF_HUB_CACHE", "HF_HOME"])
def test_sharded_hub_snapshot_loads_by_id_offline(sharded, single_logits, tmp_path, monkeypatch, env):
    cache = tmp_path / "hf" / "hub"
    snap = _fake_hub_cache(cache, "llava-hf/tiny-llava", sharded)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    if env == "HF_HUB_CACHE":
        monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    else:
        monkeypatch.delenv("HF_HUB_CACHE", raising=False)
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    h = microscope.load("llava-hf/tiny-llava")
    assert torch.equal(_logits(h), single_logits)
    assert torch.equal(_logits(microscope.load(str(snap))), single_logits)  # the snapshot directory itself

    # a shard whose blob is gone (an interrupted download): named, with the hub id's fix
    shard = _shards(sharded)[-1]
    (snap / shard).resolve().unlink()
    with pytest.raises(ModelNotFoundError, match=f"missing {shard}.*hf download llava-hf/tiny-llava") as e:
        microscope.load("llava-hf/tiny-llava")
    assert "shapes-llava" not in str(e.value)


def test_qwen2_vl_release_layout_without_processor_config(tmp_path):
    """Qwen's releases ship preprocessor_config.json and chat_template.json, no
    processor_config.json (nor chat_template.jinja): loaded as from_pretrained loads them."""
    saved = build_qwen2_vl(tmp_path / "saved")
    release = _copy(saved, tmp_path / "release")
    proc = json.loads((release / "processor_config.json").read_text())
    (release / "preprocessor_config.json").write_text(
        json.dumps({**proc.pop("image_processor"), "processor_class": proc["processor_class"]}))
    (release / "processor_config.json").unlink()
    template = (release / "chat_template.jinja").read_text()
    (release / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    (release / "chat_template.jinja").unlink()

    ref, h = microscope.load(str(saved)), microscope.load(str(release))
    assert h.processor.image_processor.to_dict() == ref.processor.image_processor.to_dict()
    assert build_prompt(h.processor, "what?") == build_prompt(ref.processor, "what?")
    assert torch.equal(_logits(h), _logits(ref))


@pytest.mark.parametrize("form", ["chat_template.jinja", "chat_template.json", "tokenizer_config.json"])
def test_chat_template_in_every_form_transformers_reads(single, tmp_path, form):
    path = _copy(single, tmp_path / "m")
    template = (path / "chat_template.jinja").read_text()
    (path / "chat_template.jinja").unlink()
    if form == "chat_template.json":
        (path / form).write_text(json.dumps({"chat_template": template}))
    elif form == "tokenizer_config.json":
        cfg = json.loads((path / form).read_text())
        (path / form).write_text(json.dumps({**cfg, "chat_template": template}))
    else:
        (path / form).write_text(template)
    h = microscope.load(str(path))
    assert build_prompt(h.processor, "Which shape?") == "USER: <image>\nWhich shape? ASSISTANT:"


def test_a_processor_without_chat_template_is_refused_at_load(single, tmp_path):
    path = _copy(single, tmp_path / "m")
    (path / "chat_template.jinja").unlink()
    with pytest.raises(ModelNotFoundError, match="has no chat template.*chat_template.jinja") as e:
        microscope.load(str(path))
    assert str(path) in str(e.value)


def test_pickle_weights_load_only_when_allowed(single, single_logits, tmp_path):
    path = _copy(single, tmp_path / "bin", weights=False)
    torch.save(load_file(single / "model.safetensors"), path / "pytorch_model.bin")
    with pytest.raises(MicroscopeError, match=r"pickle weights only \(pytorch_model.bin\).*execute arbitrary "
                                              r"code.*allow_pickle=True") as e:
        microscope.load(str(path))
    assert str(path) in str(e.value)
    h = microscope.load(str(path), allow_pickle=True)
    assert torch.equal(_logits(h), single_logits)

    # sharded pickle weights: every shard the index lists must be there
    sharded = _copy(single, tmp_path / "bin_sharded", weights=False)
    sd = load_file(single / "model.safetensors")
    names = [f"pytorch_model-0000{i}-of-00002.bin" for i in (1, 2)]
    halves = [dict(list(sd.items())[: len(sd) // 2]), dict(list(sd.items())[len(sd) // 2:])]
    for name, half in zip(names, halves):
        torch.save(half, sharded / name)
    weight_map = {k: name for name, half in zip(names, halves) for k in half}
    (sharded / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    with pytest.raises(MicroscopeError, match=r"pickle weights only \(pytorch_model.bin.index.json\)"):
        microscope.load(str(sharded))
    assert torch.equal(_logits(microscope.load(str(sharded), allow_pickle=True)), single_logits)
    (sharded / names[1]).unlink()
    with pytest.raises(ModelNotFoundError, match=f"missing {names[1]}"):
        microscope.load(str(sharded), allow_pickle=True)


def test_weights_file_named_in_config(single, single_logits, tmp_path):
    """``transformers_weights`` in config.json names the weights file, as from_pretrained reads it."""
    path = _copy(single, tmp_path / "named")
    (path / "model.safetensors").rename(path / "weights.safetensors")
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "transformers_weights": "weights.safetensors"}))
    assert torch.equal(_logits(microscope.load(str(path))), single_logits)
    (path / "weights.safetensors").unlink()
    with pytest.raises(ModelNotFoundError, match="missing weights.safetensors"):
        microscope.load(str(path))


def test_user_model_errors_name_the_model_and_its_fix(single, tmp_path):
    no_config = _copy(single, tmp_path / "no_config")
    (no_config / "config.json").unlink()
    no_weights = _copy(single, tmp_path / "no_weights", weights=False)
    cut = _copy(single, tmp_path / "cut")
    data = (cut / "model.safetensors").read_bytes()
    (cut / "model.safetensors").write_bytes(data[: len(data) // 3])
    no_tokenizer = _copy(single, tmp_path / "no_tokenizer")
    (no_tokenizer / "tokenizer.json").unlink()
    cases = {no_config: "has no config.json", no_weights: "has no weights.*no weight files at all",
             cut: "model.safetensors is truncated or corrupt", no_tokenizer: "processor.*missing tokenizer.json"}
    for path, what in cases.items():
        with pytest.raises(ModelNotFoundError, match=what) as e:
            microscope.load(str(path))
        _assert_user_error(str(e.value), path)
    with pytest.raises(ModelNotFoundError, match="does not exist") as e:
        microscope.load(str(tmp_path / "nowhere"))
    _assert_user_error(str(e.value), tmp_path / "nowhere")


def test_bundled_file_check_applies_to_bundled_models(tmp_path, monkeypatch):
    copy = tmp_path / "shapes-llava"
    shutil.copytree(microscope.zoo.model_dir("shapes-llava"), copy)
    (copy / "processor_config.json").unlink()
    monkeypatch.setitem(microscope.zoo.BUNDLED, "shapes-llava", copy)
    with pytest.raises(ModelNotFoundError, match="bundled model shapes-llava.*missing processor_config.json.*"
                                                 "microscope.zoo train shapes-llava"):
        microscope.load("shapes-llava")
    assert microscope.zoo.model_dir(str(copy)) == copy  # a directory: checked by load, as from_pretrained reads it


def test_dtype_is_validated_with_the_accepted_names(single):
    with pytest.raises(ValueError, match="dtype 'flaot16' is not accepted \\(did you mean 'float16'\\?\\).*"
                                         "'bfloat16'.*'auto'"):
        microscope.load(str(single), dtype="flaot16")
    with pytest.raises(ValueError, match="dtype torch.int8 is not accepted"):
        microscope.load(str(single), dtype=torch.int8)
    with pytest.raises(ValueError, match="dtype 'half' is not accepted"):
        microscope.load("tests.fusion_example:bunny", dtype="half", allow_factory=True)  # checked before a factory runs
    assert microscope.load(str(single), dtype="auto").dtype == torch.float32
    assert microscope.load(str(single), dtype="torch.bfloat16").dtype == torch.bfloat16


def test_unavailable_attention_implementation_is_reported_as_such(single):
    names = ["no_such_attention"]
    if importlib.util.find_spec("flash_attn") is None:
        names.append("flash_attention_2")
    for name in names:
        with pytest.raises(MicroscopeError, match=f"attention implementation '{name}' is not available for "
                                                  f".*attn_implementation='sdpa'.*'eager'.*install") as e:
            microscope.load(str(single), attn_implementation=name)
        assert not isinstance(e.value, ModelNotFoundError)  # the files are fine
        assert str(single) in str(e.value)
    assert microscope.load(str(single), attn_implementation="eager").model.config._attn_implementation == "eager"


def test_the_hub_cache_is_read_from_the_environment_at_call_time(tmp_path, monkeypatch):
    from microscope.checkpoint import hub_cache

    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert hub_cache() == tmp_path / "home" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "c"))
    assert hub_cache() == tmp_path / "c"
    monkeypatch.delenv("HF_HOME")
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert hub_cache() == tmp_path / "xdg" / "huggingface" / "hub"
