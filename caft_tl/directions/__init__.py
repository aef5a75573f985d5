"""Finding, holding and selecting concept directions at TransformerLens hook points."""

from caft_tl.directions.concepts import (
    ConceptSet,
    activation_shapes,
    check_hook_widths,
    data_fingerprint,
    make_provenance,
)

__all__ = [
    "ConceptSet",
    "activation_shapes",
    "check_hook_widths",
    "data_fingerprint",
    "make_provenance",
]
