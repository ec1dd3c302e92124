"""CLI helpers shared by the fault-campaign tests: run a command in-process, read its one-line refusal."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

from click.testing import CliRunner

from submit.cli import main

TINY = Path(__file__).resolve().parents[1] / "models" / "tiny-test.yaml"

# A child process that dies by kill -9 in the middle of an atomic write of a file or a folder.
KILLED_WRITE = textwrap.dedent("""
    import os, sys
    from submit import atomic
    kind, target = sys.argv[1], sys.argv[2]
    if kind == "dir":
        with atomic.atomic_dir(target) as tmp:
            (tmp / "half.jpg").write_bytes(b"x" * 100000)
            os.kill(os.getpid(), 9)
    with atomic.atomic_file(target, "wb") as fh:
        fh.write(b"x" * 100000)
        fh.flush()
        os.kill(os.getpid(), 9)
""")


def invoke(args: list) -> tuple[int, str]:
    """Run the CLI in-process; return (exit status, stderr); a traceback would be an uncaught exception."""
    res = CliRunner().invoke(main, [str(a) for a in args])
    assert res.exception is None or isinstance(res.exception, SystemExit), \
        f"uncaught {type(res.exception).__name__}: {res.exception}\n{res.output}"
    return res.exit_code, res.stderr


def one_error_line(stderr: str) -> str:
    """The refusal: the last stderr line, the only one starting with `error:`, and no traceback."""
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    assert "Traceback" not in stderr, stderr
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], stderr
    return errors[0]


def tiny_world(root: Path) -> tuple[Path, Path, Path]:
    """A synthetic source (20 players), its prepared DATA_DIR and a one-step tiny run: (src, data, run)."""
    import torch

    from submit import training
    from submit.prepare import prepare
    from submit.recipe import load_recipe
    from submit.synthetic import make_dataset

    torch.set_num_threads(1)
    src = make_dataset(root / "src", players=20, seqs=2, frames=3, seed=5)
    data = prepare(src, root / "data", progress=False).data_dir
    recipe = training.apply_overrides(load_recipe(TINY), ["data.workers=0", "train.checkpoint_every=0",
                                                          "train.epochs=1"])
    training.train(recipe, data, root / "runs" / "tiny", max_steps=1, progress=False)
    return src, data, root / "runs" / "tiny"


# A torchrun rank (or a plain process) that records the pair batches its sampler yields, in order, into
# DIR/pairs-TAG-RANK.json, then runs the real CLI: `python rank.py DIR TAG train ...`.
RECORDING_RANK = textwrap.dedent("""
    import json, os, sys
    import torch
    torch.set_num_threads(1)
    from submit import training
    from submit.cli import main

    seen = []

    class Recording(training.PairBatchSampler):
        def __iter__(self):
            for batch in super().__iter__():
                seen.append([list(pair) for pair in batch])
                yield batch

    training.PairBatchSampler = Recording
    try:
        main(sys.argv[3:], standalone_mode=False)
    finally:
        with open(os.path.join(sys.argv[1], f"pairs-{sys.argv[2]}-{os.environ.get('RANK', '0')}.json"), "w") as fh:
            json.dump(seen, fh)
""")


def comparable(state: dict[str, Any]) -> dict[str, Any]:
    """Blank the attention key bias: its exact gradient is zero, so Adam turns rounding noise into steps."""
    out = dict(state)
    for key in [k for k in out if k.endswith("attn.in_proj_bias")]:
        third = len(out[key]) // 3
        out[key] = out[key].clone()
        out[key][third:2 * third] = 0
    return out
