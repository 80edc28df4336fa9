"""orthserve: adapt CLIP with a few labelled images, fold the adapters away, serve it."""
from .adapters import AOFTConfig, LoRAConfig, OrthogonalConfig, TaskResConfig
from .classifier import CLIPClassifier
from .models import WeightsUnavailableError, get_tokenizer, load_model
from .surgery import (adapter_parameters, batched_rotations, bypass, count_trainable, fast_rotations, fold, inject,
                      load_adapters, max_orthogonality_error, rotate_inputs, save_adapters)

__version__ = "0.1.0"
__all__ = [
    "load_model", "get_tokenizer", "WeightsUnavailableError", "CLIPClassifier", "inject", "fold", "bypass", "rotate_inputs",
    "batched_rotations", "fast_rotations", "max_orthogonality_error",
    "save_adapters", "load_adapters", "adapter_parameters", "count_trainable",
    "OrthogonalConfig", "LoRAConfig", "AOFTConfig", "TaskResConfig",
]
