"""fusionprune: remove whole transformer layers, chosen by a learned fusion of importance signals.

The Python API (see :mod:`fusion_prune.api`)::

    from fusion_prune import compress, compute_signals, load_fusion, prune
"""

__version__ = "0.1.0"

from fusion_prune.errors import BadInputError


def __getattr__(name: str):
    # The API pulls in torch and transformers: import it on first use, so that `fusionprune --help`
    # and `from fusion_prune import BadInputError` stay fast.
    if name in ("compress", "compute_signals", "load_fusion", "prune", "CompressResult"):
        from fusion_prune import api

        return getattr(api, name)
    raise AttributeError(f"module 'fusion_prune' has no attribute {name!r}")


__all__ = ["BadInputError", "CompressResult", "__version__", "compress", "compute_signals", "load_fusion", "prune"]
