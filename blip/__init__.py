"""blip: BLIP and BLIP-2 in modern PyTorch."""
import importlib.metadata

from .api import create_model, list_models, list_pretrained, load

try:
    __version__ = importlib.metadata.version("blip")   # the installed distribution's (pyproject.toml)
except importlib.metadata.PackageNotFoundError:   # a checkout on sys.path that was never pip-installed
    __version__ = "0+unknown"

__all__ = ["__version__", "create_model", "list_models", "list_pretrained", "load"]
