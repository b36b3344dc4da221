"""Domain-mixture methods (recipe section ``mixture``): one file per method, registered in
:data:`~winnow.pipeline.mixtures.base.MIXTURE_METHODS`, over the shared loop of
:mod:`winnow.pipeline.mixtures.loop`. A new method is one new file here plus its import below (and its
test); the recipe's ``mixture`` section takes its options from the method's config model.

- :mod:`.static`: uniform, proportional, temperature (no proxy)
- :mod:`.doremi`: DoReMi (Xie et al. 2023)
- :mod:`.doge`: DoGE (Fan et al. 2023)
- :mod:`.dga`: Dynamic Gradient Alignment (Fan et al. 2024)

Only the method configs are imported here (pydantic); each method's torch work is imported when it runs,
so that the recipe can be validated without the training stack.
"""

from winnow.pipeline.mixtures import dga, doge, doremi, static  # noqa: F401  (register the methods)
from winnow.pipeline.mixtures.base import MIXTURE_METHODS, MixtureCommon, MixtureMethod, MixtureRun, register

__all__ = ["MIXTURE_METHODS", "MixtureCommon", "MixtureMethod", "MixtureRun", "register"]
