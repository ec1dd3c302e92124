"""Where the bundled model recipes (`models/`) and ensemble specs (`ensembles/`) live.

In a checkout (or an editable install) they are the top-level `models/` and `ensembles/` folders, the
only copies anyone edits. A built wheel (`pip install .`, not editable) carries copies of them as package
data in `submit/_bundled/{models,ensembles}`, put there by setup.py's build step, so the demo and
`--ensemble NAME` work without the checkout. Specs name recipes relative to themselves
(`../models/x.yaml`), which holds in both places.
"""

from __future__ import annotations

from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
CHECKOUT = PACKAGE.parent
PACKAGED = PACKAGE / "_bundled"  # written by setup.py's build_py into the wheel; absent in a checkout


def _root() -> Path:
    """The checkout when this package sits in one (setup.cfg beside it), else the wheel's packaged copies."""
    if (CHECKOUT / "setup.cfg").is_file() and (CHECKOUT / "ensembles").is_dir():
        return CHECKOUT
    return PACKAGED


ROOT = _root()
MODELS = ROOT / "models"
ENSEMBLES = ROOT / "ensembles"


def recipe_path(name: str | Path) -> Path:
    """A recipe file: a path as given, or a bare name (`demo-cnn`, `demo-cnn.yaml`) that is no file here but one
    of the bundled `models/` (so an installed wheel trains them by name); otherwise `name` unchanged."""
    path = Path(name)
    if path.exists() or len(path.parts) != 1:
        return path
    for candidate in (MODELS / path.name, MODELS / f"{path.name}.yaml"):
        if candidate.is_file():
            return candidate
    return path
