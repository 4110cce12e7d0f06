"""Early-exit curricula C(t, l): which exits are in the loss at step t (LayerSkip, section 4.2.2).

Terminology:
  L      number of decoder layers; exit l is the output of layer l (0-based), l = L-1 is the model's output.
  t, T   the optimizer step (0-based) and the total number of steps.
  active the exits with C(t, l) = 1 at step t. The last layer is always active.

Curricula:
  rotational (R)  exit l is active when (l - t) mod R == 0: every R-th layer, the pattern moving one layer
                  deeper per step, so each layer is an exit once every R steps.
  gradual         exits are switched on from the last layer downwards, one every T/(2L) steps: exit l is
                  active once 2 L t >= (L-1-l) T, so all are on by t = T/2.
  none            every layer is an exit at every step.
  last            only the last layer: no early-exit loss (plain training, e.g. layer dropout alone, as in the
                  paper's ablations; also the baseline of the benchmark).

Each curriculum is a pure function of t: nothing to save in a checkpoint, and a resumed run continues where
the interrupted one stopped (torchtune's gradual curriculum, by contrast, counts calls and restarts at 0).
"""
from __future__ import annotations

from dataclasses import dataclass

CURRICULA = ("rotational", "gradual", "none", "last")


@dataclass(frozen=True)
class Curriculum:
    """C(t, l) for one of `CURRICULA`.

    Args:
        kind: "rotational" | "gradual" | "none" | "last".
        num_layers: L.
        rotation: R, for "rotational" (>= 1; R = 1 makes every layer an exit every step).
        total_steps: T, for "gradual".

    Example:
        >>> Curriculum("rotational", num_layers=6, rotation=4).active(1)
        [1, 5]
    """

    kind: str
    num_layers: int
    rotation: int = 8
    total_steps: int = 1

    def __post_init__(self):
        if self.kind not in CURRICULA:
            raise ValueError(f"unknown curriculum {self.kind!r}; choose from {', '.join(CURRICULA)}")
        if self.rotation < 1:
            raise ValueError(f"rotation R must be >= 1, got {self.rotation}")

    def is_active(self, step: int, layer: int) -> bool:
        """C(t, l) as a bool."""
        last = self.num_layers - 1
        if layer == last or self.kind == "none":
            return True
        if self.kind == "last":
            return False
        if self.kind == "rotational":
            return (layer - step) % self.rotation == 0
        # gradual: exit l switches on at t = (L-1-l) * T / (2L); integer arithmetic, no rounding drift
        return 2 * self.num_layers * step >= (last - layer) * self.total_steps

    def active(self, step: int) -> list[int]:
        """The active exits at step t, ascending; always ends with L-1."""
        return [l for l in range(self.num_layers) if self.is_active(step, l)]
