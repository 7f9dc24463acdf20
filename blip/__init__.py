"""blip: BLIP and BLIP-2 in modern PyTorch."""
from .api import create_model, list_models, load

__all__ = ["create_model", "list_models", "load"]
