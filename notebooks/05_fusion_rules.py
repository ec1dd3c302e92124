# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 05 · Ensemble fusion rules
#
# **Question:** how should the distance matrices of several models be fused: plain mean (2022 winners),
# mean of per-query ranks, per-query reliability weighting (2023 winners: each member weighted by how
# well its top-k agrees with the others) or the mean of mean and reliability (what the 2023 winners
# submitted)? And does it matter whether members are re-ranked before fusion?
#
# Members are runs of the budget's base recipe with different overrides (the same runs notebooks 01
# and 02 train, so with a shared WORK_DIR nothing is trained twice). Equal member weights. Scores on
# the test split, in percent; each member alone is listed for reference.

# %% tags=["parameters"]
DATA_DIR = None  # a prepared DATA_DIR (`reident-submit prepare`); None: synthetic demo data under WORK_DIR
WORK_DIR = None  # runs, cached features and results (None: <repo>/runs/notebooks); re-runs reuse them
BUDGET = "ci"  # "ci": tiny random models, 1 epoch (seconds); "full": models/cpu-small.yaml (minutes per run)
THREADS = None  # torch threads (None: torch's default; 1 is fastest for the tiny "ci" models on a busy machine)
MEMBERS = None  # [{"recipe.key": value, ...}, ...] overrides per member; None: the budget's members below
RELIABILITY_K = 15  # top-k used by the reliability rule
RERANK = {"k1": 20, "k2": 6, "lambda_value": 0.3}  # the per-member re-ranking of the second half

# %%
import pandas as pd

from submit import ablation
from submit.ensembling import FUSIONS, fuse
from submit.reranking import postprocess

work = ablation.setup(WORK_DIR, THREADS)
data = ablation.data_dir(DATA_DIR, work, BUDGET)
query, gallery = ablation.split_rows(data)
members = MEMBERS or {
    "ci": [{}, {"train.loss": "triplet"}, {"backbone.name": "timm:test_resnet"}],
    "full": [{}, {"train.loss": "triplet"}, {"backbone.name": "timm:resnet34"}],
}[BUDGET]
feats = {}
for variant in members:
    run = ablation.variant_run(variant, BUDGET, data, work)
    feats[ablation.variant_name(variant)] = ablation.split_features(run, data, query, gallery, work)
print(f"data: {data} ({len(query)} queries x {len(gallery)} gallery); members: {list(feats)}")

# %% [markdown]
# Each member alone, then every fusion rule, on cosine distances and on per-member re-ranked distances.

# %%
inputs = {
    "cosine": {name: ablation.cosine(q, g) for name, (q, g) in feats.items()},
    "re-ranked": {name: postprocess(q, g, [{"rerank": RERANK}]) for name, (q, g) in feats.items()},
}
rows = []
for kind, dists in inputs.items():
    for name, dist in dists.items():
        rows.append({"input": kind, "method": f"member: {name}", **ablation.score(dist, query, gallery)})
    for rule in FUSIONS:
        fused = fuse(list(dists.values()), [1.0] * len(dists), rule, RELIABILITY_K)
        rows.append({"input": kind, "method": f"fusion: {rule}", **ablation.score(fused, query, gallery)})
table = pd.DataFrame(rows)
ablation.save_table(table, work, "05_fusion_rules")
table

# %%
fig, axes = ablation.new_figure(ncols=2)
for ax, (kind, part) in zip(axes, table.groupby("input", sort=False)):
    ablation.dot_plot(ax, part, "method", metrics=["mAP", "rank1", "mINP"], title=f"{kind} distances")
fig.suptitle(f"Fusion rules over {len(feats)} members ({BUDGET} budget, test split)")
ablation.save_plot(fig, work, "05_fusion_rules");

# %% [markdown]
# With two members the agreement is symmetric, so `reliability` equals `mean`: use three or more.
