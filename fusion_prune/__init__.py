"""fusionprune: remove whole transformer layers, chosen by a learned fusion of importance signals."""

__version__ = "0.1.0"

from fusion_prune.errors import BadInputError

__all__ = ["BadInputError", "__version__"]
