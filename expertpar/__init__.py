"""expertpar: sparse-MoE vision-language training with experts on Ray.

``from expertpar import SparseMoE`` gives the MoE layer as a drop-in ``torch.nn.Module``
(sparse_moe.py); it is imported on first use, so ``import expertpar`` stays light.
"""
__version__ = "0.1.0"

_LAZY = {"SparseMoE", "RayExperts", "MoEStats"}


def __getattr__(name: str):
    if name in _LAZY:
        from . import sparse_moe
        return getattr(sparse_moe, name)
    raise AttributeError(f"module 'expertpar' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
