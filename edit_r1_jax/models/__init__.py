"""Model ports. ``from edit_r1_jax.models import qwen2_5_vl, flux`` gives the public model APIs (lazy)."""
import importlib

__all__ = ["qwen2_5_vl", "flux"]


def __getattr__(name):
    if name in __all__:
        return importlib.import_module(f"edit_r1_jax.models.{name}")
    raise AttributeError(name)
