"""Read weights files and restore them into jft models."""

from jft.weights import keymaps
from jft.weights.convert import convert, infer_arch, load_checkpoint, save_checkpoint
from jft.weights.export import export
from jft.weights.pretrained import from_pretrained
from jft.weights.readers import read
from jft.weights.restore import RestoreReport, WeightsError, restore

__all__ = [
    "RestoreReport",
    "WeightsError",
    "convert",
    "export",
    "from_pretrained",
    "infer_arch",
    "keymaps",
    "load_checkpoint",
    "read",
    "restore",
    "save_checkpoint",
]
