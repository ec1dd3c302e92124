"""Ensembles: a spec YAML naming member models, how their distances are fused and what post-processing runs.

Fusion rules, the registry `FUSIONS` (name -> function taking member distance matrices (Q, G), lower = closer,
member weights and the spec's `reliability_k`); those registered here:
- `mean`: the weighted mean of distances (the 2022 winners' ensemble).
- `rank`: the weighted mean of each member's per-query gallery ranks (ties get their average rank),
  divided by G - 1 so it lies in [0, 1]. Robust to members whose distance scales differ.
- `reliability`: the 2023 winners' per-query weighting: member m's weight for query q is its spec weight
  times its agreement, the mean over the other members of |top-k(m) & top-k(n)| / k (k = `reliability_k`,
  15), normalised over members; a query where no member agrees with another falls back to the spec weights.
- `mean+reliability`: the mean of the `mean` and `reliability` results, as the 2023 winners submitted.
  (With two members agreement is symmetric, so `reliability` equals `mean`; it needs three or more.)

The spec (`ensembles/*.yaml`, loaded by `load_spec` into the frozen `EnsembleSpec`):

    members:                       # one or more
      - run: runs/vit-l-14         # a training run dir (recipe.yaml + best.pt/last.pt), or
        checkpoint: best           # best | last | a path to a .pt file (default best)
        weight: 1.0                # fusion weight (default 1)
        tta: {scales: [1.0, 1.1]}  # optional override of the recipe's tta fields (hflip, scales, batch_size)
      - recipe: ../models/vit-l-14-openai.yaml   # a recipe: its pretrained backbone used zero-shot
      - onnx: embedder.onnx        # from `reident-submit export` (onnxruntime; the run's TTA it records + `tta`)
    fusion: mean+reliability       # a name in FUSIONS
    reliability_k: 15
    postprocess:                   # applied in order; ops: submit.reranking.STEPS; k_reciprocal (distances out) last
      - {op: pca_whitening, params: {dim: 560, fit_on: train}}   # fit_on: train | query+gallery
      - {op: k_reciprocal, params: {k1: 20, k2: 6, lambda_value: 0.3}}
    postprocess_on: member         # member: each member's features, then fuse | fused: see below
    jersey:                        # optional: shirt-number agreement on the final distances
      numbers: numbers.csv         # from `reident-submit jersey`, or `model`/`pretrained` to read zero-shot
      bonus: 0.1                   # subtracted where both confident numbers agree
      penalty: 0.1                 # added where both are confident and differ
      threshold: 0.5               # a number counts when its probability reaches this

Relative paths resolve against the spec file's folder. A path starting with `${RUNS}` is taken from
the `runs_dir` argument (`predict --runs-dir`), so one spec can name the runs of any output folder
(quote it inside YAML flow mappings: `{run: '${RUNS}/a'}`).
`postprocess_on: fused` runs the chain once on the members' weight-scaled, concatenated features, whose
cosine distance is exactly the weighted mean of the members' cosine distances; it needs `fusion: mean`.
A step fitted on the training split (`pca_whitening` with `fit_on: train`) gets the member's features of the
manifest's train rows (embedded and cached like the others; concatenated the same way in fused mode).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal, Sequence

import numpy as np

from submit import bundled, config, reranking
from submit.errors import SubmitError
from submit.recipe import Recipe, TTASpec, apply_overrides, has_key, load_recipe
from submit.space import Param, integers

RUNS_PLACEHOLDER = "${RUNS}"


def resolve_spec_path(name: str | Path) -> Path:
    """A path to a spec file, or a bare name (`best`, `best.yaml`) in the bundled `ensembles/` (`submit.bundled`)."""
    path = Path(name)
    if path.is_file():
        return path
    if len(path.parts) == 1:
        for candidate in (bundled.ENSEMBLES / path.name, bundled.ENSEMBLES / f"{path.name}.yaml"):
            if candidate.is_file():
                return candidate
    known = ", ".join(sorted(p.stem for p in bundled.ENSEMBLES.glob("*.yaml")))
    raise SubmitError(f"{name}: ensemble spec not found (a path, or one of: {known or 'none'})")


@dataclass(frozen=True)
class TTAOverride:
    """Fields that replace the member recipe's `tta` ones; unset fields keep the recipe's value."""

    hflip: bool | None = None
    scales: tuple[float, ...] | None = config.bounded(None, gt=0.0)
    batch_size: int | None = config.bounded(None, ge=1)

    def apply(self, base: TTASpec) -> TTASpec:
        """The recipe's TTA spec with this override's set fields replaced."""
        changes = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) is not None}
        return dataclasses.replace(base, **changes)


@dataclass(frozen=True)
class TrainFrom:
    """How a member's run is produced: a recipe (path relative to the spec), an optional seed and overrides."""

    recipe: str
    seed: int | None = config.bounded(None, ge=0, le=2**32 - 1)
    overrides: tuple[str, ...] = ()  # `--set` style, e.g. "train.epochs=2"


@dataclass(frozen=True)
class MemberSpec:
    """One ensemble member: a fine-tuned run (or a recipe's pretrained backbone), its checkpoint, TTA, weight."""

    run: str | None = None
    recipe: str | None = None
    checkpoint: str = "best"
    tta: TTAOverride = field(default_factory=TTAOverride)
    weight: float = config.bounded(1.0, ge=0.0)
    name: str | None = None  # label in the score table; default: the run folder or recipe file name
    train: TrainFrom | None = None  # lets `train --ensemble` (and the demo) produce the run
    onnx: str | None = None  # instead of run/recipe: an exported embedder (`reident-submit export`)


@dataclass(frozen=True)
class StepSpec:
    """One post-processing step: a name in `submit.reranking.STEPS` and its keyword parameters."""

    op: str
    params: dict[str, int | float | str] = field(default_factory=dict)


@dataclass(frozen=True)
class JerseySpec:
    """The ensemble post-processing step `jersey:`: where numbers come from and how strongly they count.

    Numbers come from a CSV written by `reident-submit jersey` (`numbers`, path relative to the spec's
    folder or absolute; matched to rows by manifest path) or are read zero-shot with `model`/`pretrained`.
    """

    model: str | None = None  # open_clip architecture, e.g. ViT-L-14
    pretrained: str | None = None  # open_clip tag, hf-hub:<org>/<repo>, or a checkpoint file
    numbers: str | None = None  # a numbers CSV instead of a model
    bonus: float = config.bounded(0.1, ge=0.0)
    penalty: float = config.bounded(0.1, ge=0.0)
    threshold: float = config.probability(0.5)
    batch_size: int = config.bounded(64, ge=1)


@dataclass(frozen=True)
class TuneSpec:
    """The spec's `tune:` block: what `reident-submit tune` searches on held-out identities.

    By default every parameter of every post-processing step (its registered `space`), the fusion rule (and its
    own parameters) and, with two or more members, the member weights. `space` replaces or adds a key's range
    (`postprocess[3].k1: {low: 5, high: 30, integer: true}`, `fusion: {choices: [mean, rank]}`); `fixed` keeps
    keys at the spec's value; `only`, when given, keeps every key but these (a narrow search on few queries);
    `weights: false` keeps the member weights."""

    space: dict[str, Param] = field(default_factory=dict)
    fixed: tuple[str, ...] = ()
    only: tuple[str, ...] = ()
    weights: bool = True

    def searches(self, key: str) -> bool:
        """Whether `key` may be searched: not in `fixed`, and in `only` when `only` is given."""
        return key not in self.fixed and (not self.only or key in self.only)


@dataclass(frozen=True)
class EnsembleSpec:
    """A whole `ensembles/<name>.yaml`."""

    members: tuple[MemberSpec, ...]
    fusion: str = "mean"  # a name in FUSIONS
    reliability_k: int = config.bounded(15, ge=1)
    postprocess: tuple[StepSpec, ...] = ()
    postprocess_on: Literal["member", "fused"] = "member"
    jersey: JerseySpec | None = None  # shirt numbers: read by `submit.jersey`, applied by `reranking.number_agreement`
    tune: TuneSpec = field(default_factory=TuneSpec)  # what `tune` searches (see TuneSpec)

    @property
    def fused_chain(self) -> bool:
        """Whether the chain runs once on the members' concatenated features, which needs fusion 'mean'."""
        return self.postprocess_on == "fused" and bool(self.postprocess)


def load_spec(path: str | Path, runs_dir: str | Path | None = None, require_runs: bool = True) -> EnsembleSpec:
    """Load, validate and resolve an ensemble spec: member paths become absolute and must exist.

    `require_runs=False` (used before training the members) resolves run paths without checking them.
    """
    path = Path(path)
    where = str(path)
    spec = config.load(EnsembleSpec, path)
    check_names(spec, where)
    if not spec.members:
        raise SubmitError(f"{where}: key 'members': expected at least one member")
    if spec.reliability_k < 1:
        raise SubmitError(f"{where}: key 'reliability_k': expected >= 1, got {spec.reliability_k}")
    if spec.fused_chain and spec.fusion != "mean":
        raise SubmitError(f"{where}: key 'postprocess_on': 'fused' needs fusion 'mean' (got {spec.fusion!r})")
    check_steps(spec.postprocess, where)
    check_tune_keys(spec, where)
    spec = dataclasses.replace(spec, jersey=_resolve_jersey(spec.jersey, path.parent, where))
    members = tuple(_resolve_member(m, path.parent, runs_dir, where, f"members[{i}]", require_runs)
                    for i, m in enumerate(spec.members))
    return dataclasses.replace(spec, members=_unique_names(members))


def _resolve_jersey(step: JerseySpec | None, base: Path, where: str) -> JerseySpec | None:
    """The jersey step with an absolute, existing `numbers` file; exactly one number source."""
    if step is None:
        return None
    check_number_source(step, f"{where}: key 'jersey'")
    if step.numbers is None:
        return step
    numbers = (base / step.numbers).resolve()
    if not numbers.is_file():
        raise SubmitError(f"{where}: key 'jersey.numbers': {numbers} not found (write it with `reident-submit jersey`)")
    return dataclasses.replace(step, numbers=str(numbers))


def tunable_keys(spec: EnsembleSpec) -> list[str]:
    """Every key a `tune:` block may name for this spec: each step's parameters, the fusion rule, reliability_k and
    each member's weight."""
    keys = [f"postprocess[{i}].{name}" for i, step in enumerate(spec.postprocess)
            if step.op in reranking.STEPS for name in reranking.STEPS[step.op].parameters()]
    return keys + ["fusion", "reliability_k"] + [f"members[{i}].weight" for i in range(len(spec.members))]


def train_key(key: str) -> tuple[int, str] | None:
    """(member index, recipe key) for a training key such as `members[0].train.lr` (searched by `tune
    --train-space` in that member's recipe); None for any other key."""
    head, _, rest = key.partition("].")
    if not head.startswith("members[") or not head[8:].isdigit() or rest in ("", "weight"):
        return None
    return int(head[8:]), rest


def check_tune_keys(spec: EnsembleSpec, where: str) -> None:
    """The `tune:` block names only keys of this spec (post-processing, fusion and weight keys, or a recipe key
    of a member with a `train` block), each with a usable range or choice list."""
    allowed = tunable_keys(spec)
    blocks = {"space": list(spec.tune.space), "fixed": list(spec.tune.fixed), "only": list(spec.tune.only)}
    for kind, keys in blocks.items():
        for key in keys:
            if key in allowed or _trainable(spec, key):
                continue
            raise SubmitError(f"{where}: key 'tune.{kind}': {key!r} is not a tunable key of this spec "
                              f"(allowed: {', '.join(allowed)}, or members[i].<recipe key> of a member with "
                              "a 'train' block)")
    for key, param in spec.tune.space.items():
        param.check(f"{where}: key 'tune.space.{key}'")
        if key == "fusion" and (param.choices is None or not set(param.choices) <= set(FUSIONS)):
            raise SubmitError(f"{where}: key 'tune.space.fusion': expected choices among {list(FUSIONS)}")
        if key == "fusion" and spec.fused_chain and set(param.choices or ()) != {"mean"}:
            raise SubmitError(f"{where}: key 'tune.space.fusion': postprocess_on: fused needs fusion 'mean' only")


def _trainable(spec: EnsembleSpec, key: str) -> bool:
    """Whether `key` is `members[i].<recipe key>` of a member that has a `train` block."""
    found = train_key(key)
    return (found is not None and found[0] < len(spec.members) and spec.members[found[0]].train is not None
            and has_key(found[1]))


def member_recipe(member: MemberSpec, where: str | Path) -> Recipe:
    """The recipe a member with a `train` block trains: its recipe file, its seed, then its overrides."""
    assert member.train is not None
    seed = [] if member.train.seed is None else [f"seed={member.train.seed}"]
    return apply_overrides(load_recipe(member.train.recipe), [*seed, *member.train.overrides],
                           where=f"{where}: member {member.name} train.overrides")


def check_number_source(step: JerseySpec, where: str) -> None:
    """A `jersey:` block reads numbers from exactly one source: a model (zero-shot) or a numbers CSV."""
    if (step.model is None) == (step.numbers is None):
        raise SubmitError(f"{where}: give exactly one of 'model' (zero-shot reading) or 'numbers' (a CSV)")


def _resolve_onnx(m: MemberSpec, base: Path, runs_dir: str | Path | None, where: str, key: str) -> MemberSpec:
    """An `onnx:` member: the file must exist, and it takes no run/recipe/checkpoint/train keys."""
    extra = [k for k in ("run", "recipe", "train") if getattr(m, k) is not None] + (
        ["checkpoint"] if m.checkpoint != "best" else [])
    if extra:
        raise SubmitError(f"{where}: key '{key}.onnx': an ONNX member takes no {', '.join(extra)}")
    path = _path(m.onnx or "", base, runs_dir, where, f"{key}.onnx")
    if not path.is_file():
        raise SubmitError(f"{where}: key '{key}.onnx': {path} not found (write it with `reident-submit export`)")
    return dataclasses.replace(m, onnx=str(path), name=m.name or path.stem)


def member_checkpoint(member: MemberSpec) -> Path | None:
    """The weights file a resolved member loads (None for a recipe member)."""
    if member.run is None:
        return None
    if member.checkpoint in ("best", "last"):
        return Path(member.run) / f"{member.checkpoint}.pt"
    return Path(member.checkpoint)


def check_names(spec: EnsembleSpec, where: str) -> None:
    """The fusion rule and each step's op must be registered (`FUSIONS`, `submit.reranking.STEPS`)."""
    if spec.fusion not in FUSIONS:
        raise SubmitError(f"{where}: key 'fusion': expected one of {list(FUSIONS)}, got {spec.fusion!r}")
    for i, step in enumerate(spec.postprocess):
        if step.op not in reranking.STEPS:
            raise SubmitError(f"{where}: key 'postprocess[{i}].op': expected one of {list(reranking.STEPS)}, "
                              f"got {step.op!r}")


def check_steps(steps: Sequence[StepSpec], where: str) -> None:
    """Each step's params must be parameters of its registered function; a distance step comes last."""
    for i, step in enumerate(steps):
        registered = reranking.STEPS[step.op]
        allowed = registered.parameters()
        for name in step.params:
            if name not in allowed:
                raise SubmitError(f"{where}: key 'postprocess[{i}].params.{name}': not a parameter of "
                                  f"{step.op} (allowed: {', '.join(allowed)})")
        if registered.distances and i != len(steps) - 1:
            raise SubmitError(f"{where}: key 'postprocess[{i}]': {step.op} returns distances, so it must be the "
                              "last step")


def _resolve_member(m: MemberSpec, base: Path, runs_dir: str | Path | None, where: str, key: str,
                    require_runs: bool = True) -> MemberSpec:
    """Absolute paths for run/recipe/checkpoint; one-line errors for missing files or bad combinations."""
    if m.onnx is not None:
        return _resolve_onnx(m, base, runs_dir, where, key)
    if (m.run is None) == (m.recipe is None):
        raise SubmitError(f"{where}: key {key!r}: give exactly one of 'run' or 'recipe' (or 'onnx' alone)")
    if m.train is not None:
        if m.run is None:
            raise SubmitError(f"{where}: key '{key}.train': only run members can be trained")
        recipe = _path(m.train.recipe, base, runs_dir, where, f"{key}.train.recipe")
        if not recipe.is_file():
            raise SubmitError(f"{where}: key '{key}.train.recipe': recipe file {recipe} not found")
        m = dataclasses.replace(m, train=dataclasses.replace(m.train, recipe=str(recipe)))
    if m.weight < 0:
        raise SubmitError(f"{where}: key '{key}.weight': expected >= 0, got {m.weight}")
    if m.recipe is not None:
        recipe = _path(m.recipe, base, runs_dir, where, f"{key}.recipe")
        if not recipe.is_file():
            raise SubmitError(f"{where}: key '{key}.recipe': recipe file {recipe} not found")
        if m.checkpoint != "best":
            raise SubmitError(f"{where}: key '{key}.checkpoint': only run members have checkpoints")
        if load_recipe(recipe).backbone.pretrained is None:
            raise SubmitError(f"{where}: key '{key}.recipe': {recipe} has no backbone.pretrained weights; "
                              "a zero-shot member needs them (or use a trained run)")
        return dataclasses.replace(m, recipe=str(recipe), name=m.name or recipe.stem)
    run = _path(m.run or "", base, runs_dir, where, f"{key}.run")
    if not require_runs:
        return dataclasses.replace(m, run=str(run), name=m.name or run.name)
    if not (run / "recipe.yaml").is_file():
        raise SubmitError(f"{where}: key '{key}.run': {run} is not a training run dir (no recipe.yaml)")
    ckpt = m.checkpoint
    if ckpt not in ("best", "last"):
        ckpt = str(_path(ckpt, base, runs_dir, where, f"{key}.checkpoint"))
    resolved = dataclasses.replace(m, run=str(run), checkpoint=ckpt)
    weights = member_checkpoint(resolved)
    if weights is None or not weights.is_file():
        raise SubmitError(f"{where}: key '{key}.checkpoint': checkpoint {weights} not found")
    tag = "" if ckpt == "best" else f"@{Path(ckpt).stem}"
    return dataclasses.replace(resolved, name=m.name or f"{run.name}{tag}")


def _path(value: str, base: Path, runs_dir: str | Path | None, where: str, key: str) -> Path:
    """Expand `${RUNS}` from `runs_dir` (a command-line path: relative to the working folder) and resolve
    other relative paths against the spec folder."""
    if value.startswith(RUNS_PLACEHOLDER):
        if runs_dir is None:
            raise SubmitError(f"{where}: key {key!r} uses {RUNS_PLACEHOLDER}; pass the runs folder (--runs-dir)")
        value = str(Path(runs_dir).expanduser().resolve()) + value[len(RUNS_PLACEHOLDER):]
    path = Path(value).expanduser()
    return (path if path.is_absolute() else base / path).resolve()


def _unique_names(members: tuple[MemberSpec, ...]) -> tuple[MemberSpec, ...]:
    """Suffix repeated member names with #2, #3, ... so score-table rows stay distinct."""
    seen: dict[str, int] = {}
    out = []
    for m in members:
        name = m.name or "member"
        seen[name] = seen.get(name, 0) + 1
        out.append(m if seen[name] == 1 else dataclasses.replace(m, name=f"{name}#{seen[name]}"))
    return tuple(out)


def fuse(dists: Sequence[np.ndarray], weights: Sequence[float], rule: str = "mean", k: int = 15) -> np.ndarray:
    """Fuse member distance matrices with the rule `FUSIONS[rule]`; returns a float32 (Q, G) matrix."""
    mats, w = _check(dists, weights)
    if rule not in FUSIONS:
        raise SubmitError(f"unknown fusion {rule!r}; expected one of {list(FUSIONS)}")
    return np.asarray(FUSIONS[rule](mats, w, k)).astype(np.float32)


def fuse_mean(dists: Sequence[np.ndarray], weights: Sequence[float], k: int = 15) -> np.ndarray:
    """Weighted mean of distance matrices (`k` unused: the rules share one signature)."""
    w = np.asarray(weights, dtype=np.float64)
    return sum(wi * np.asarray(d, dtype=np.float64) for wi, d in zip(w, dists)) / w.sum()


def fuse_rank(dists: Sequence[np.ndarray], weights: Sequence[float], k: int = 15) -> np.ndarray:
    """Weighted mean of per-query gallery ranks (0 = nearest), scaled to [0, 1] (`k` unused)."""
    w = np.asarray(weights, dtype=np.float64)
    g = np.asarray(dists[0]).shape[1]
    total = sum(wi * average_ranks(np.asarray(d)) for wi, d in zip(w, dists)) / w.sum()
    return total / max(g - 1, 1)


def fuse_reliability(dists: Sequence[np.ndarray], weights: Sequence[float], k: int = 15) -> np.ndarray:
    """Per-query weighted mean, each member weighted by how well its top-k agrees with the others'."""
    mats = [np.asarray(d, dtype=np.float64) for d in dists]
    qw = reliability_weights(mats, weights, k)  # (M, Q)
    return sum(qw[m][:, None] * mats[m] for m in range(len(mats)))


def fuse_mean_reliability(dists: Sequence[np.ndarray], weights: Sequence[float], k: int = 15) -> np.ndarray:
    """The mean of the `mean` and `reliability` results, as the 2023 winners submitted."""
    return 0.5 * (fuse_mean(dists, weights) + fuse_reliability(dists, weights, k))


FusionRule = Callable[[Sequence[np.ndarray], Sequence[float], int], np.ndarray]


@dataclass(frozen=True)
class Fusion:
    """A registered fusion rule: its function and what `tune` searches for it by default (spec keys)."""

    fn: FusionRule
    space: dict[str, Param] = field(default_factory=dict)

    def __call__(self, dists: Sequence[np.ndarray], weights: Sequence[float], k: int) -> np.ndarray:
        return self.fn(dists, weights, k)


_RELIABILITY_K = {"reliability_k": integers(3, 40)}

# The fusion rules: name -> Fusion (member (Q, G) distances, member weights, the spec's reliability_k) -> (Q, G).
FUSIONS: dict[str, Fusion] = {
    "mean": Fusion(fuse_mean),
    "rank": Fusion(fuse_rank),
    "reliability": Fusion(fuse_reliability, _RELIABILITY_K),
    "mean+reliability": Fusion(fuse_mean_reliability, _RELIABILITY_K),
}


def reliability_weights(dists: Sequence[np.ndarray], weights: Sequence[float], k: int = 15) -> np.ndarray:
    """(M, Q) per-query member weights summing to 1 over members: spec weight x top-k agreement."""
    w = np.asarray(weights, dtype=np.float64)
    m_count = len(dists)
    q, g = np.asarray(dists[0]).shape
    if m_count == 1:
        return np.ones((1, q))
    k = max(1, min(k, g))
    tops = [top_k_mask(np.asarray(d), k) for d in dists]
    agree = np.zeros((m_count, q))
    for a in range(m_count):
        for b in range(m_count):
            if a != b:
                agree[a] += (tops[a] & tops[b]).sum(axis=1) / k
    agree /= m_count - 1
    raw = w[:, None] * agree
    total = raw.sum(axis=0)
    fallback = np.broadcast_to((w / w.sum())[:, None], raw.shape)
    return np.where(total > 0, raw / np.where(total > 0, total, 1.0), fallback)


def top_k_mask(dist: np.ndarray, k: int) -> np.ndarray:
    """(Q, G) boolean mask of each query's k nearest gallery items."""
    idx = np.argpartition(dist, k - 1, axis=1)[:, :k]
    mask = np.zeros(dist.shape, dtype=bool)
    np.put_along_axis(mask, idx, True, axis=1)
    return mask


def average_ranks(dist: np.ndarray) -> np.ndarray:
    """Per-row ranks of `dist` (0 = smallest); tied values share the mean of their positions."""
    order = np.argsort(dist, axis=1, kind="stable")
    srt = np.take_along_axis(dist, order, axis=1)
    q, g = dist.shape
    pos = np.broadcast_to(np.arange(g), (q, g))
    starts = np.ones((q, g), dtype=bool)
    starts[:, 1:] = srt[:, 1:] != srt[:, :-1]
    ends = np.ones((q, g), dtype=bool)
    ends[:, :-1] = starts[:, 1:]
    first = np.maximum.accumulate(np.where(starts, pos, 0), axis=1)
    last = np.minimum.accumulate(np.where(ends, pos, g - 1)[:, ::-1], axis=1)[:, ::-1]
    ranks = np.empty((q, g), dtype=np.float64)
    np.put_along_axis(ranks, order, (first + last) / 2.0, axis=1)
    return ranks


def _check(dists: Sequence[np.ndarray], weights: Sequence[float]) -> tuple[list[np.ndarray], list[float]]:
    """Members must share one (Q, G) shape and have non-negative weights with a positive sum."""
    if not dists:
        raise SubmitError("an ensemble needs at least one member")
    if len(weights) != len(dists):
        raise SubmitError(f"{len(dists)} member matrices but {len(weights)} weights")
    mats = [np.asarray(d) for d in dists]
    shapes = {m.shape for m in mats}
    if len(shapes) != 1 or mats[0].ndim != 2:
        raise SubmitError(f"member distance matrices disagree in shape: {sorted(shapes)}")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise SubmitError(f"member weights must be >= 0 with a positive sum, got {list(weights)}")
    return mats, [float(w) for w in weights]
