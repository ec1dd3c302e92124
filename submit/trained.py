"""A trained embedder back from a run folder: the checkpoint's recipe (`run_folder`) built into its tower
(`backbones`) with the trained weights. The one way predict, explain, export, ablation and the trainer's own
callers get a fine-tuned model; it lies above both, so the run-folder contract stays files only.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from submit import config
from submit.backbones import build_embedder
from submit.recipe import Recipe
from submit.run_folder import check_same_backbone, checkpoint_path, load_checkpoint


def load_trained(run_dir: str | Path, checkpoint: str = "best") -> tuple[nn.Module, Recipe]:
    """The trained embedder (EMA weights when the run used EMA) and its recipe, from RUN_DIR/<checkpoint>.pt.

    `checkpoint` is 'best', 'last' or a path to a .pt file. The backbone is built without pretrained
    weights (nothing is downloaded); the checkpoint supplies them.
    """
    path = checkpoint_path(run_dir, checkpoint)
    obj = load_checkpoint(path)
    recipe = config.from_mapping(Recipe, obj["recipe"], where=str(path))
    check_same_backbone(Path(run_dir) / "recipe.yaml", path, recipe)
    embedder = build_embedder(recipe.backbone, load_weights=False)
    weights = obj.get("ema") or obj["model"]
    embedder.load_state_dict(weights)
    return embedder.eval(), recipe
