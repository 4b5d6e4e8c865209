"""Model-family knowledge: which pipeline component is the denoiser, where joint attention puts
the text, where the latent grid comes from, and the context-parallel plan.

:mod:`.families` holds one record per family; :mod:`.grid` reads a forward's grid. Private to
attnpatch (not in ``attnpatch.__all__``): the patcher, the scripts and the strategies use it.
"""

from .families import (DENOISER_COMPONENTS, FAMILIES, Family, denoiser_components, family_of,
                       model_family, sharding_plan, text_position)
from .grid import forward_info

__all__ = ["DENOISER_COMPONENTS", "FAMILIES", "Family", "denoiser_components", "family_of",
           "model_family", "sharding_plan", "text_position", "forward_info"]
