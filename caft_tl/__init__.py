"""caft-tl: Concept Ablation Fine-Tuning (CAFT) and model diffing on TransformerLens."""

from caft_tl import compare, data, diagnostics, directions, distributed, evals, fast, models, tasks
from caft_tl.activations import ActivationDiff, Activations, activation_diff, cache_activations
from caft_tl.directions import ConceptSet
from caft_tl.interventions import Ablation, Steering, load_intervention
from caft_tl.lora import LoraConfig
from caft_tl.models import load_model, load_tokenizer, save_model
from caft_tl.train import TrainConfig, evaluate_loss, finetune

__all__ = [
    "Ablation",
    "ActivationDiff",
    "Activations",
    "activation_diff",
    "ConceptSet",
    "LoraConfig",
    "Steering",
    "TrainConfig",
    "cache_activations",
    "compare",
    "data",
    "diagnostics",
    "directions",
    "distributed",
    "evals",
    "evaluate_loss",
    "fast",
    "finetune",
    "load_intervention",
    "load_model",
    "load_tokenizer",
    "models",
    "save_model",
    "tasks",
]
__version__ = "0.1.0"
