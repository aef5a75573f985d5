"""caft-tl: Concept Ablation Fine-Tuning (CAFT) and model diffing on TransformerLens."""

from caft_tl import data, directions, models
from caft_tl.activations import ActivationDiff, Activations, activation_diff, cache_activations
from caft_tl.directions import ConceptSet
from caft_tl.interventions import Ablation, Steering, load_intervention
from caft_tl.models import load_model, load_tokenizer, save_model

__all__ = [
    "Ablation",
    "ActivationDiff",
    "Activations",
    "activation_diff",
    "ConceptSet",
    "Steering",
    "cache_activations",
    "data",
    "directions",
    "load_intervention",
    "load_model",
    "load_tokenizer",
    "models",
    "save_model",
]
__version__ = "0.1.0"
