"""Statistics: the ``Statistic`` protocol and the built-ins (the exact kernels live in ``mmdit_probe.kernels``)."""

from ..kernels import (attention_with_lse, blockwise_lse, complement_mass, default_scale, entropy, key_column_mass,
                       key_set_mass, lse_over_keys, probabilities)
from .builtin import Entropy, GroupMass, KeyMass, Mass, WordMap
from .statistic import Statistic

__all__ = ["Entropy", "GroupMass", "KeyMass", "Mass", "Statistic", "WordMap", "attention_with_lse", "blockwise_lse",
           "complement_mass", "default_scale", "entropy", "key_column_mass", "key_set_mass", "lse_over_keys",
           "probabilities"]
