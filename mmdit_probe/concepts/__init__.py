"""Concept maps (ConceptAttention, ICML'25): where is "dog" — whether or not the prompt names it.

Concept tokens are embedded with the model's own text encoders and carried through the text stream
of every block as read-only tokens (image and prompt tokens never see them; the model's output is
bitwise unchanged). Maps per step / layer / row / concept: the concept queries' attention over the
image, and ConceptAttention's output-space map.
"""

from .api import concept_maps
from .attend import ConceptAttention, concept_attention, output_scores
from .path import BlockInputs, ConceptPath, ConceptQKV
from .probe import PATHS, ConceptProbe
from .result import ConceptMaps
from .tokens import ConceptError, ConceptTokens

__all__ = ["PATHS", "BlockInputs", "ConceptAttention", "ConceptError", "ConceptMaps", "ConceptPath", "ConceptProbe",
           "ConceptQKV", "ConceptTokens", "concept_attention", "concept_maps", "output_scores"]
