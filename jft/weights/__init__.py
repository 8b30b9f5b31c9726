"""Read weights files and restore them into jft models."""

from jft.weights import keymaps
from jft.weights.restore import RestoreReport, WeightsError, restore

__all__ = ["RestoreReport", "WeightsError", "keymaps", "restore"]
