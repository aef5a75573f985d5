"""What the dictionary trainers' configs share: a budget of training rows spent in batches."""

from __future__ import annotations

import dataclasses
from typing import Any


class TokenBudget:
    """Mixin for training configs (dataclasses) that spend ``training_tokens`` rows in
    batches of ``batch_size``."""

    training_tokens: int
    batch_size: int

    def _check_budget(self) -> None:
        if self.training_tokens < self.batch_size:
            raise ValueError(
                f"training_tokens={self.training_tokens} is less than one batch "
                f"(batch_size={self.batch_size})"
            )

    @property
    def steps(self) -> int:
        return self.training_tokens // self.batch_size

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]
