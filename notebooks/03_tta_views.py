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
# # 03 · Test-time augmentation views
#
# **Question:** do test-time views (horizontal flip, extra scales) improve retrieval of a trained model,
# and is the gain worth the extra embedding passes?
#
# One run (the budget's base recipe) is embedded under each TTA setting: features of every view are
# L2-normalised, averaged and renormalised (`submit.embedding`). Cost is the number of forward passes
# per crop. Scores: cosine distances on the test split, in percent.

# %% tags=["parameters"]
DATA_DIR = None  # a prepared DATA_DIR (`reident-submit prepare`); None: synthetic demo data under WORK_DIR
WORK_DIR = None  # runs, cached features and results (None: <repo>/runs/notebooks); re-runs reuse them
BUDGET = "ci"  # "ci": tiny random ViT, 1 epoch (seconds); "full": models/cpu-small.yaml (minutes per run)
THREADS = None  # torch threads (None: torch's default; 1 is fastest for the tiny "ci" models on a busy machine)
SCALES = [0.9, 1.0, 1.1]  # the multi-scale views (1.0 = the letterboxed crop as trained)

# %%
import pandas as pd

from submit import ablation
from submit.recipe import TTASpec

work = ablation.setup(WORK_DIR, THREADS)
data = ablation.data_dir(DATA_DIR, work, BUDGET)
query, gallery = ablation.split_rows(data)
run = ablation.ensure_run(ablation.recipe(BUDGET), data, work)
print(f"data: {data} ({len(query)} queries x {len(gallery)} gallery); run {run.name}")

# %%
settings = {
    "none": TTASpec(hflip=False, scales=(1.0,)),
    "flip": TTASpec(hflip=True, scales=(1.0,)),
    "scales": TTASpec(hflip=False, scales=tuple(SCALES)),
    "flip + scales": TTASpec(hflip=True, scales=tuple(SCALES)),
}
rows = []
for name, tta in settings.items():
    q, g = ablation.split_features(run, data, query, gallery, work, tta)
    views = len(tta.scales) * (2 if tta.hflip else 1)
    rows.append({"tta": name, "views": views, **ablation.score(ablation.cosine(q, g), query, gallery)})
table = pd.DataFrame(rows)
table["mAP_gain"] = (table["mAP"] - table["mAP"].iloc[0]).round(2)
ablation.save_table(table, work, "03_tta_views")
table

# %%
fig, ax = ablation.new_figure()
ablation.dot_plot(ax, table.assign(label=table["tta"] + " (" + table["views"].astype(str) + " views)"), "label",
                  metrics=["mAP", "rank1", "mINP"], title=f"TTA views ({BUDGET} budget, test split)")
ablation.save_plot(fig, work, "03_tta_views");
