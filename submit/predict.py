"""Predict: an ensemble spec + a prepared data dir -> the official ranking file (and, on the test split, an ablation).

For each member: embed the split's query + gallery crops with TTA (cached, see `embedding`), turn the
features into cosine distances (1 - q.g) or run the post-processing chain on them, then fuse the members
(`ensembling.fuse`). The file is written through `ranking_file.write_ranking` and read back with its
validator. On the test split every stage is scored (each member, each member after each step, the fused
result, each step on the fused features), so one command is an ablation table.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import os
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pandas as pd
import torch
import yaml

from submit import atomic, config, embedding, ensembling, holdout, reranking, trained
from submit.backbones import build_embedder
from submit.ensembling import EnsembleSpec, MemberSpec, StepSpec, resolve_spec_path
from submit.errors import SubmitError
from submit.export import OnnxEmbedder, member_tta, read_metadata
from submit.jersey import apply_jersey
from submit.manifest import fingerprint, read_manifest, select
from submit.metrics import METRIC_KEYS, evaluate_distances
from submit.ranking_file import read_ranking, write_ranking
from submit.recipe import BackboneSpec, load_recipe, override
from submit.reranking import cosine_distance
from submit.run_folder import recorded_manifest

SPLITS = ("test", "challenge")


def predict(spec_path: str | Path, data_dir: str | Path, split: str, out: str | Path,
            device: str | None = None, runs_dir: str | Path | None = None, workers: int = 2,
            progress: bool = True) -> dict:
    """Write the `split` ranking file `out` for an ensemble; returns {out, spec, split, members, shape,
    postprocess, scores, notes}.

    `scores` maps a stage label to its metrics (mAP, rank1, rank5, rank10, mINP) on the test split and is
    empty on the challenge split (no identities). The last entry is the written file, re-read and scored.
    """
    if split not in SPLITS:
        raise SubmitError(f"--split {split!r}: expected one of {list(SPLITS)}")
    atomic.check_file_target(Path(out))  # a folder in the way is refused before any embedding
    spec_file = resolve_spec_path(spec_path)
    spec = ensembling.load_spec(spec_file, runs_dir)
    manifest = read_manifest(data_dir)
    query, gallery = select(manifest, split, "query"), select(manifest, split, "gallery")
    notes = member_notes(spec, manifest, data_dir, split == "test")  # refuses members trained on different data
    score = _scorer(query, gallery) if split == "test" else None
    stages: dict[str, np.ndarray] = {}
    final = fuse_members(spec, data_dir, query, gallery, device, workers, progress, stages, score is not None)
    if spec.jersey is not None:  # resolved at load: its numbers CSV (absolute) or its model
        final = apply_jersey(final, query, gallery, data_dir, spec.jersey, device=device, progress=progress)
        stages["+ shirt numbers"] = final
    q_ids, g_ids = query["image_id"].to_numpy(), gallery["image_id"].to_numpy()
    write_ranking(out, final, q_ids, g_ids)
    written, _, _ = read_ranking(out, expect_queries=q_ids, expect_gallery=g_ids)
    stages[next(reversed(stages))] = written  # score what was submitted (5 decimals); same id order
    scores = {label: score(d) for label, d in stages.items()} if score else {}
    chain = f"post-processing on {'each member' if spec.postprocess_on == 'member' else 'the fused features'}: " \
        f"{chain_text(spec.postprocess)}" if spec.postprocess else "no post-processing"
    return {"out": str(out), "spec": str(spec_file), "split": split, "members": [m.name for m in spec.members],
            "shape": [int(final.shape[0]), int(final.shape[1])], "postprocess": chain, "scores": scores,
            "notes": notes}


def fit_weights(spec_path: str | Path, data_dir: str | Path, out: str | Path,
                grid: tuple[float, ...] = (0.0, 0.5, 1.0, 2.0), device: str | None = None,
                runs_dir: str | Path | None = None, workers: int = 2, progress: bool = True) -> dict:
    """Grid-search member weights on DATA_DIR's test split (best mAP, then rank-1) and write the spec with them to
    `out`: `tune`'s special case of member weights only, by grid.

    Every weight vector from `grid`^members (not all zero, proportional duplicates skipped) fuses the members'
    cached distances with the spec's rule (before any `jersey` step, which is copied unchanged). On a held-out
    folder (`tune --holdout`, scripts/real_holdout.py) the test split is held-out TRAIN identities; on a
    prepared DATA_DIR it is the real test split, so the fitted score flatters itself (`fitted_on: test`, a note).
    """
    atomic.check_file_target(Path(out))
    spec_file = resolve_spec_path(spec_path)
    spec = ensembling.load_spec(spec_file, runs_dir)
    if spec.fused_chain:
        raise SubmitError(f"{spec_file}: fitting weights needs postprocess_on: member "
                          "(fused re-runs the chain per try)")
    if not grid or any(w < 0 for w in grid) or max(grid) <= 0:
        raise SubmitError(f"--grid {list(grid)}: expected non-negative weights, at least one positive")
    manifest = read_manifest(data_dir)
    query, gallery = select(manifest, "test", "query"), select(manifest, "test", "gallery")
    notes = member_notes(spec, manifest, data_dir, test_split=True)
    score = _scorer(query, gallery)
    feats = member_feature_pairs(spec, data_dir, query, gallery, device, workers, progress)
    trains = [train_features(m, data_dir, device, workers, progress) for m in spec.members]
    mats = member_distances(spec, feats, trains)

    def evaluate(weights: tuple[float, ...]) -> dict:
        return score(ensembling.fuse(mats, weights, spec.fusion, spec.reliability_k))

    before = evaluate(tuple(m.weight for m in spec.members))
    tried = {w: evaluate(w) for w in weight_grid(len(mats), grid)}
    best = max(tried, key=lambda w: (tried[w]["mAP"], tried[w]["rank1"]))
    record = holdout.holdout_record(data_dir)
    where = f"held-out TRAIN identities of {data_dir} (fold {record.fold} of {record.source})" if record else \
        f"the test split of {data_dir}"
    if record is None:
        notes.append("weights fitted on the test split they are scored on: the fitted score is optimistic; fit on "
                     "held-out identities (a folder from `tune --holdout` or scripts/real_holdout.py) instead")
    weights = {f"members[{i}].weight": w for i, w in enumerate(best)}
    write_spec_values(spec_file, out, weights, f"# fitted on {where}: mAP "
                      f"{100 * before['mAP']:.2f} with the spec's weights -> {100 * tried[best]['mAP']:.2f}\n")
    ensembling.load_spec(out, runs_dir)  # the written spec must load as written
    return {"out": str(out), "members": [m.name for m in spec.members], "weights": list(best),
            "score": tried[best], "spec_score": before, "tried": len(tried), "notes": notes,
            "fitted_on": "held-out" if record else "test"}


def weight_grid(members: int, grid: tuple[float, ...]) -> list[tuple[float, ...]]:
    """Weight vectors from `grid`^members, without the all-zero one and without proportional duplicates."""
    seen, out = set(), []
    for w in itertools.product(sorted(set(float(v) for v in grid)), repeat=members):
        total = sum(w)
        key = tuple(round(v / total, 9) for v in w) if total > 0 else None
        if key is not None and key not in seen:
            seen.add(key)
            out.append(w)
    return out


def write_spec_values(spec_file: Path, out: str | Path, values: dict[str, Any], header: str) -> Path:
    """Copy `spec_file` to `out` with `values` (spec key -> value: `members[1].weight`, `postprocess[0].dim`,
    `fusion`, `reliability_k`, as `ensembling.tunable_keys` names them, or a training key `members[0].train.lr`,
    written as that member's override) put in place, `header` (comment lines) on top; relative paths are
    re-based on `out`'s folder."""
    out = Path(out)
    data = config.read_yaml(spec_file)
    for key, value in values.items():
        if key.startswith("postprocess["):
            step = data["postprocess"][key_index(key)]
            step["params"] = {**(step.get("params") or {}), key.split(".", 1)[1]: value}
        elif found := ensembling.train_key(key):  # members[i].<recipe key>: one of the member's train.overrides
            train = data["members"][found[0]]["train"]
            kept = [o for o in train.get("overrides") or () if o.partition("=")[0].strip() != found[1]]
            train["overrides"] = [*kept, override(found[1], value)]
        elif key.startswith("members["):
            data["members"][key_index(key)]["weight"] = float(value)
        else:
            data[key] = value
    old, new = spec_file.parent, out.parent
    for member in data["members"]:
        for key in ("run", "recipe", "checkpoint", "onnx"):
            value = member.get(key)
            if isinstance(value, str) and not (key == "checkpoint" and value in ("best", "last")):
                member[key] = _rebase(value, old, new)
        if isinstance(member.get("train"), dict) and isinstance(member["train"].get("recipe"), str):
            member["train"]["recipe"] = _rebase(member["train"]["recipe"], old, new)
    if isinstance(data.get("jersey"), dict) and isinstance(data["jersey"].get("numbers"), str):
        data["jersey"]["numbers"] = _rebase(data["jersey"]["numbers"], old, new)
    return atomic.write_text(out, header + f"# from {spec_file}\n" + yaml.safe_dump(data, sort_keys=False))


def key_index(key: str) -> int:
    """The list index in a spec key such as `postprocess[3].k1` or `members[1].weight`."""
    return int(key.split("[", 1)[1].split("]", 1)[0])


def _rebase(value: str, old: Path, new: Path) -> str:
    """A spec path relative to folder `old`, rewritten relative to folder `new` (${RUNS} and absolute kept)."""
    if value.startswith(ensembling.RUNS_PLACEHOLDER) or Path(value).expanduser().is_absolute():
        return value
    return os.path.relpath(os.path.abspath(old / Path(value).expanduser()), os.path.abspath(new))


def member_notes(spec: EnsembleSpec, manifest: pd.DataFrame, data_dir: str | Path, test_split: bool) -> list[str]:
    """Check the run members against each other and `data_dir`'s manifest (`manifest_notes`, which refuses a mix)
    and, for scores on the test split, add `leak_notes`."""
    trained, data_fp = trained_manifests(spec), fingerprint(manifest)
    notes = manifest_notes(trained, data_fp, data_dir)
    return notes + leak_notes(spec, trained, data_fp) if test_split else notes


def trained_manifests(spec: EnsembleSpec) -> dict[str, str | None]:
    """Run member name -> fingerprint of the manifest its checkpoint was trained on (None: not recorded).

    Read from the checkpoint the member loads, memory-mapped, so no weights are read. Pretrained (zero-shot)
    members are left out: they were never trained on a manifest.
    """
    out: dict[str, str | None] = {}
    for m in spec.members:
        ckpt = ensembling.member_checkpoint(m)
        if ckpt is not None:
            out[m.name or "member"] = recorded_manifest(ckpt)
        elif m.onnx is not None:  # an exported run keeps its manifest in the file's metadata
            out[m.name or "member"] = read_metadata(m.onnx).get("manifest") or None
    return out


def manifest_notes(trained: dict[str, str | None], data_manifest: str, data_dir: str | Path) -> list[str]:
    """Refuse run members trained on different manifests; notes for unrecorded ones and for other --data.

    Members that agree with each other but not with `data_dir` pass: predicting another set is legitimate.
    """
    known = {name: fp for name, fp in trained.items() if fp is not None}
    first = next(iter(known.items()), None)
    for name, fp in known.items():
        if first and fp != first[1]:
            raise SubmitError(f"members {first[0]} and {name} were trained on different manifests "
                              f"({first[1][:12]} vs {fp[:12]}); ensemble runs trained on the same prepared data")
    notes = []
    unknown = [name for name, fp in trained.items() if fp is None]
    if unknown:
        notes.append(f"member(s) {', '.join(unknown)} record no training manifest (trained before "
                     "fingerprints were kept), so they are not checked against the others")
    if first is not None and first[1] != data_manifest:
        notes.append(f"run members were trained on manifest {first[1][:12]}, not on {Path(data_dir) / 'manifest.csv'} "
                     f"({data_manifest[:12]}): other data, fine when intended")
    return notes


def leak_notes(spec: EnsembleSpec, trained: dict[str, str | None], data_manifest: str) -> list[str]:
    """Warnings for test-split scores that are optimistic: members trained on test crops (data.split all or
    kfold), and `checkpoint: best` of data.split train runs, whose best.pt was picked by test-split mAP
    (unless the run trained on another manifest than `data_manifest`, per `trained`)."""
    notes = []
    for m in spec.members:
        if m.run is None:
            continue
        data_split = load_recipe(Path(m.run) / "recipe.yaml").data.split
        if data_split in ("all", "kfold"):
            notes.append(f"member {m.name} trained on test-split crops (data.split: {data_split}); "
                         "its test scores are optimistic")
        elif m.checkpoint == "best" and trained.get(m.name or "member") in (None, data_manifest):
            notes.append(f"member {m.name} uses best.pt, chosen by test-split mAP during training (data.split: "
                         "train), so its test scores are optimistic; use checkpoint: last for a fair score")
    return notes


def fuse_members(spec: EnsembleSpec, data_dir: str | Path, query: pd.DataFrame, gallery: pd.DataFrame,
                 device: str | None, workers: int, progress: bool, stages: dict[str, np.ndarray],
                 ablate: bool) -> np.ndarray:
    """The ensemble's final (Q, G) distances; with `ablate`, every intermediate matrix lands in `stages`."""
    feats = member_feature_pairs(spec, data_dir, query, gallery, device, workers, progress)
    trains = [train_features(m, data_dir, device, workers, progress) for m in spec.members]
    return ensemble_distances(spec, feats, trains, stages, ablate)


def member_feature_pairs(spec: EnsembleSpec, data_dir: str | Path, query: pd.DataFrame, gallery: pd.DataFrame,
                         device: str | None, workers: int, progress: bool) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per member: its (query, gallery) TTA features (cached on disk, see `member_features`)."""
    rows = pd.concat([query, gallery], ignore_index=True)
    pairs = []
    for m in spec.members:
        f = member_features(m, data_dir, rows, device, workers, progress)
        if f.shape[0] != len(rows):
            raise SubmitError(f"member {m.name}: {f.shape[0]} feature rows for {len(rows)} manifest rows")
        pairs.append((f[:len(query)], f[len(query):]))
    return pairs


def ensemble_distances(spec: EnsembleSpec, feats: list[tuple[np.ndarray, np.ndarray]],
                       trains: list[Callable[[], np.ndarray]], stages: dict[str, np.ndarray] | None = None,
                       ablate: bool = False) -> np.ndarray:
    """The spec's final (Q, G) distances from its members' features: each member's chain then fusion, or fusion
    of the weighted, concatenated features then one chain (`postprocess_on`). `trains` give each member's
    training-split features on demand. The fused stages land in `stages`; with `ablate`, every member stage too."""
    weights = [m.weight for m in spec.members]
    label = f"fused ({spec.fusion})"
    record = stages if stages is not None else {}
    if spec.postprocess_on == "member" and spec.postprocess:
        per_member = member_distances(spec, feats, trains, record if ablate else None)
        if ablate and len(feats) > 1:
            record[f"{label}, raw"] = ensembling.fuse([cosine_distance(q, g) for q, g in feats], weights,
                                                      spec.fusion, spec.reliability_k)
        final = ensembling.fuse(per_member, weights, spec.fusion, spec.reliability_k)
        record[label] = final
        return final
    raw = member_distances(dataclasses.replace(spec, postprocess=()), feats, trains, record if ablate else None)
    final = ensembling.fuse(raw, weights, spec.fusion, spec.reliability_k)
    record[label] = final
    if spec.postprocess:
        q_cat, g_cat = concat_features(feats, weights)
        train = functools.cache(lambda: weighted_concat([t() for t in trains], weights))
        for step_label, final in stage_distances(q_cat, g_cat, spec.postprocess, train):
            record[f"{label} {step_label}"] = final
    return final


def member_distances(spec: EnsembleSpec, feats: list[tuple[np.ndarray, np.ndarray]],
                     trains: list[Callable[[], np.ndarray]], stages: dict[str, np.ndarray] | None = None
                     ) -> list[np.ndarray]:
    """Per member: its cosine distances after the spec's chain (run on each member's features), or before it
    when there is none. Each stage also lands in `stages` when given."""
    out = []
    for m, (q, g), train in zip(spec.members, feats, trains):
        last = cosine_distance(q, g)
        if stages is not None:
            stages[m.name or "member"] = last
        for step_label, last in stage_distances(q, g, spec.postprocess, train):
            if stages is not None:
                stages[f"{m.name} {step_label}"] = last
        out.append(last)
    return out


def member_features(member: MemberSpec, data_dir: str | Path, rows: pd.DataFrame, device: str | None,
                    workers: int, progress: bool) -> np.ndarray:
    """One member's TTA features of `rows`, from the cache when present (then no weights are loaded)."""
    if member.onnx is not None:
        return _onnx_features(member, data_dir, rows, device, workers, progress)
    if member.run is not None:
        recipe = load_recipe(Path(member.run) / "recipe.yaml")
        ckpt = ensembling.member_checkpoint(member)
        identity = embedding.checkpoint_identity(ckpt, recipe.backbone)  # type: ignore[arg-type]
        loader = _run_loader(member)
    else:
        recipe = load_recipe(member.recipe)  # type: ignore[arg-type]
        identity = pretrained_identity(recipe.backbone)
        loader = _pretrained_loader(recipe.backbone)
    tta = member.tta.apply(recipe.tta)
    return embedding.embed(loader, data_dir, rows, tta, device=device, workers=workers, identity=identity,
                           precision=recipe.train.precision, progress=progress, label=f"embed {member.name}")


def _onnx_features(member: MemberSpec, data_dir: str | Path, rows: pd.DataFrame, device: str | None,
                   workers: int, progress: bool) -> np.ndarray:
    """An `onnx:` member: the exported file (onnxruntime) under the member's `tta` over the TTA the file records
    (its run's, `export.member_tta`), so it ranks as the same run used as a `run:` member does."""
    path = member.onnx or ""
    tta = member.tta.apply(member_tta(path))
    return embedding.embed(lambda: OnnxEmbedder(path), data_dir, rows, tta, device=device, workers=workers,
                           identity=embedding.checkpoint_identity(path, "onnx"), precision="fp32",
                           progress=progress, label=f"embed {member.name}")


def train_features(member: MemberSpec, data_dir: str | Path, device: str | None, workers: int,
                   progress: bool) -> Callable[[], np.ndarray]:
    """A function returning the member's features of the manifest's train rows, embedded (and cached) on its first
    call only: what a step fitted on the training split (pca_whitening, fit_on: train) asks for."""

    @functools.cache
    def load() -> np.ndarray:
        rows = select(read_manifest(data_dir), "train", "train")
        return member_features(member, data_dir, rows, device, workers, progress)
    return load


def _run_loader(member: MemberSpec) -> Callable[[], torch.nn.Module]:
    def load() -> torch.nn.Module:
        return trained.load_trained(member.run, member.checkpoint)[0]  # type: ignore[arg-type]
    return load


def _pretrained_loader(backbone: BackboneSpec) -> Callable[[], torch.nn.Module]:
    def load() -> torch.nn.Module:
        return build_embedder(backbone)
    return load


def pretrained_identity(backbone: BackboneSpec) -> str:
    """Pretrained tags name fixed weights; a local weights file is identified by its content hash."""
    local = Path(backbone.pretrained).expanduser() if backbone.pretrained else None
    if local is not None and local.is_file():
        return embedding.checkpoint_identity(local, backbone)
    return "pretrained:" + json.dumps(config.to_mapping(backbone), sort_keys=True)


def concat_features(feats: list[tuple[np.ndarray, np.ndarray]], weights: list[float]) -> tuple[np.ndarray, np.ndarray]:
    """Members' features side by side, each scaled by sqrt(w / sum w): unit rows whose cosine distance is
    the weighted mean of the members' cosine distances."""
    return weighted_concat([f[0] for f in feats], weights), weighted_concat([f[1] for f in feats], weights)


def weighted_concat(mats: list[np.ndarray], weights: list[float]) -> np.ndarray:
    """Feature matrices side by side, each scaled by sqrt(w / sum w) (float32)."""
    total = float(sum(weights))
    scale = [np.sqrt(w / total) for w in weights]
    return np.concatenate([s * m for s, m in zip(scale, mats)], axis=1).astype(np.float32)


def stage_distances(q: np.ndarray, g: np.ndarray, steps: tuple[StepSpec, ...],
                    train_feats: Callable[[], np.ndarray] | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """The spec's steps through `submit.reranking.run_chain`, yielding ("+ QE + re-rank"-style label, distances)
    after each: the distance step's own, else the cosine distances of the features so far."""
    for stage in reranking.run_chain(q, g, [(step.op, step.params) for step in steps], train_feats):
        dist = stage.distances
        yield stage.label, dist if dist is not None else cosine_distance(stage.query, stage.gallery)


def chain_text(steps: tuple[StepSpec, ...]) -> str:
    """The chain with its parameters, e.g. 'QE(k=1) -> re-rank(k1=20, k2=6, lambda_value=0.3)'."""
    parts = []
    for step in steps:
        params = ", ".join(f"{k}={v:g}" if isinstance(v, (int, float)) else f"{k}={v}" for k, v in step.params.items())
        parts.append(f"{reranking.STEPS[step.op].label}({params})")
    return " -> ".join(parts)


def _scorer(query: pd.DataFrame, gallery: pd.DataFrame) -> Callable[[np.ndarray], dict]:
    q_pids, g_pids = query["pid"].to_numpy(), gallery["pid"].to_numpy()

    def score(dist: np.ndarray) -> dict:
        result = evaluate_distances(dist, q_pids, g_pids)
        return {k: float(result[k]) for k in METRIC_KEYS}
    return score
