"""Model handle: one loader for bundled, local and cached HF image-text-to-text models.

    h = microscope.load("shapes-llava")             # bundled
    h = microscope.load("/data/llava-1.5-7b-hf")    # a local save_pretrained directory
    h = microscope.load("llava-hf/llava-1.5-7b-hf") # an id already in the HF cache (offline)
    h.model, h.processor, h.adapter.layers, h.adapter.final_norm, h.adapter.unembed

The :class:`Adapter` is the only place that knows where an architecture keeps its decoder
layers, final norm and unembedding; everything else asks it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from microscope.errors import MicroscopeError, ModelNotFoundError

#: attention implementation the suite loads models with: its interventions work through
#: transformers' attention interface, which ``sdpa`` and ``eager`` both honour
DEFAULT_ATTENTION = "sdpa"
#: families whose image (prefix) tokens attend bidirectionally: refused with a reason
BIDIRECTIONAL_IMAGE_ATTENTION = ("paligemma", "gemma3")
SUPPORTED = {
    "llava": "LlavaForConditionalGeneration",
    "llava_next": "LlavaNextForConditionalGeneration",
    "idefics3": "Idefics3ForConditionalGeneration",
}


@dataclass
class Adapter:
    """Where an architecture keeps the parts the suite needs."""

    embed: torch.nn.Module
    layers: torch.nn.ModuleList
    final_norm: torch.nn.Module
    unembed: torch.nn.Module
    image_token_id: int

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    def check_layers(self, layers, allow_embedding: bool = True) -> list[int]:
        """Validate layer indices: 0..n_layers-1 are decoder layers, -1 is the embedding output.

        Raises ``ValueError`` naming the bad layer and the valid range.
        """
        lo = -1 if allow_embedding else 0
        out = []
        for lay in layers:
            if not isinstance(lay, (int,)) or isinstance(lay, bool) or not lo <= lay < self.n_layers:
                raise ValueError(
                    f"layer {lay!r} is out of range: this model has {self.n_layers} decoder layers "
                    f"(0..{self.n_layers - 1}" + (", and -1 for the embedding output)" if allow_embedding
                                                  else ")"))
            out.append(int(lay))
        return out


@dataclass
class Handle:
    """A loaded model with its processor and adapter."""

    name: str
    model: torch.nn.Module
    processor: object
    adapter: Adapter

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def config_hash(self) -> str:
        """SHA-256 (first 16 hex digits) of the model config's canonical JSON."""
        d = self.model.config.to_dict()
        d.pop("_name_or_path", None)
        d.pop("transformers_version", None)
        blob = json.dumps(d, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def _language_model(model):
    inner = getattr(model, "model", model)
    lm = getattr(inner, "language_model", None) or getattr(inner, "text_model", None)  # Idefics3: text_model
    if lm is None:
        raise MicroscopeError(f"{type(model).__name__}: no language_model found; not an image-text-to-text "
                              "model this suite supports")
    return lm


def adapter_for(model) -> Adapter:
    """The :class:`Adapter` of a loaded LLaVA-family model."""
    lm = _language_model(model)
    image_token_id = getattr(model.config, "image_token_id", None)
    if image_token_id is None:
        image_token_id = model.config.image_token_index
    return Adapter(embed=model.get_input_embeddings(), layers=lm.layers, final_norm=lm.norm,
                   unembed=model.get_output_embeddings(), image_token_id=int(image_token_id))


def _resolve(name_or_path: str) -> Path:
    from microscope.zoo import BUNDLED, model_dir

    looks_like_path = name_or_path.startswith((".", "~", "/")) or Path(name_or_path).expanduser().is_dir()
    if name_or_path in BUNDLED or looks_like_path:
        return model_dir(name_or_path)
    if "/" in name_or_path and not Path(name_or_path).is_absolute():
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(name_or_path, local_files_only=True))
        except Exception as e:
            raise ModelNotFoundError(
                f"model {name_or_path!r} is not in the local Hugging Face cache and the hub cannot be "
                "reached from here: download it where there is internet (`hf download "
                f"{name_or_path} --local-dir DIR`), copy DIR here and call microscope.load(DIR)"
            ) from e
    raise ModelNotFoundError(
        f"unknown model {name_or_path!r}: pass a bundled name ({', '.join(BUNDLED)}), a local "
        "directory written by save_pretrained, or a hub id (org/name) already in the HF cache"
    )


def load(name_or_path: str | Path = "shapes-llava", device: str | torch.device | None = None,
         dtype: torch.dtype | str | None = None, attn_implementation: str = DEFAULT_ATTENTION,
         device_map: str | dict | None = None) -> Handle:
    """Load a model, its processor and adapter, offline, in eval mode.

    ``dtype`` defaults to the checkpoint's own (float32 for shapes-llava); ``device`` to CPU.
    ``device_map`` (e.g. ``"auto"``) shards a large model over the visible GPUs with accelerate,
    as ``from_pretrained`` does; hooks and interventions work on the sharded model unchanged.
    """
    if device_map is not None and device is not None:
        raise ValueError("give either device (one device) or device_map (sharding), not both")
    if device_map is not None:
        try:
            import accelerate  # noqa: F401
        except ImportError as e:
            raise MicroscopeError("device_map needs the accelerate package: pip install accelerate") from e
    import transformers
    from transformers import AutoConfig, AutoProcessor

    path = _resolve(str(name_or_path))
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as e:
        raise ModelNotFoundError(f"model directory {path}: config.json is missing or unreadable ({e})") from e
    if config.model_type in BIDIRECTIONAL_IMAGE_ATTENTION:
        raise MicroscopeError(
            f"model type {config.model_type!r} of {path} is refused: its image tokens attend to each other "
            "bidirectionally (a prefix-LM mask), while the suite's roles of 'earlier' and 'later' tokens, its "
            "knockout edges and its tracing shortcuts assume causal attention. Supported: "
            f"{sorted(SUPPORTED)}")
    cls_name = SUPPORTED.get(config.model_type)
    if cls_name is None:
        raise MicroscopeError(
            f"model type {config.model_type!r} of {path} is not supported; supported: {sorted(SUPPORTED)}")
    cls = getattr(transformers, cls_name)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    try:
        processor = AutoProcessor.from_pretrained(path, local_files_only=True)
        extra = {"device_map": device_map} if device_map is not None else {}
        model = cls.from_pretrained(path, local_files_only=True, dtype=dtype or "auto",
                                    attn_implementation=attn_implementation, **extra)
    except Exception as e:
        raise ModelNotFoundError(
            f"model directory {path} could not be loaded ({type(e).__name__}: {str(e)[:300]}); its files "
            "are incomplete, corrupt or from another model") from e
    model.eval()
    if device is not None:
        model.to(device)
    return Handle(name=str(name_or_path), model=model, processor=processor, adapter=adapter_for(model))
