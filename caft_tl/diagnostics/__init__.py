"""Diagnostics: what ablating concept directions does besides removing them.

- :func:`ablation_shift`: where ablation moves a model: the directions' projections,
  concept probes and SAE latents, with and without it;
- :func:`steering_vs_ablation` / :func:`sign_report`: behaviour of a model (no training)
  under zero- and mean-ablation and under steering by c x the mean projection; is
  zero-ablation a disguised steer, and in which direction?
- :func:`training_decomposition`: the same fine-tune under zero-ablation, its activation-only
  (detached) and gradient-only halves, and steering by ±k x the mean projection.
"""

from caft_tl.diagnostics.decomposition import (
    condition_names,
    decomposition_figure,
    decomposition_interventions,
    decomposition_table,
    training_decomposition,
)
from caft_tl.diagnostics.report import diagnostics_report, sign_sentences
from caft_tl.diagnostics.shift import AblationShift, ablation_shift
from caft_tl.diagnostics.steering import (
    DEFAULT_COEFS,
    Judge,
    SteeringSweep,
    sign_report,
    steering_vs_ablation,
)

__all__ = [
    "AblationShift",
    "ablation_shift",
    "DEFAULT_COEFS",
    "Judge",
    "SteeringSweep",
    "condition_names",
    "decomposition_figure",
    "decomposition_interventions",
    "decomposition_table",
    "diagnostics_report",
    "sign_report",
    "sign_sentences",
    "steering_vs_ablation",
    "training_decomposition",
]
