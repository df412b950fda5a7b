"""mllm-microscope: look inside multimodal LLMs.

    import microscope
    h = microscope.load("shapes-llava")                  # model handle (model, processor, adapter)
    batch = microscope.prepare_samples(h, samples)       # inputs with per-token roles
"""

from microscope.model import Adapter, Handle, load
from microscope.roles import ROLES, Batch, prepare, prepare_samples

__all__ = ["Adapter", "Handle", "load", "ROLES", "Batch", "prepare", "prepare_samples"]
__version__ = "0.1.0"
