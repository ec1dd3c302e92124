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
# # 07 · Pre-trained vs scratch vs zero-shot
#
# **Question:** the CLIP-ReIdent claim in miniature: does a tower pre-trained elsewhere, then fine-tuned
# contrastively on pairs of crops, beat the same tower trained from scratch with the same budget, and
# the pre-trained tower used as it is (zero-shot)?
#
# Three rows, one architecture, input size and training budget: **zero-shot** (pre-trained weights, no
# fine-tuning), **scratch** (random weights, fine-tuned), **pre-trained** (fine-tuned from the weights).
# With `BUDGET = "pretrained"` the weights are the ImageNet MobileNetV2 of `models/cpu-pretrained.yaml`
# (`reident-submit weights fetch mobilenetv2-imagenet` first); the "ci" and "full" budgets name no weights,
# so they pre-train the budget's recipe on OTHER synthetic players (no identity shared with the data
# analysed) as a stand-in that needs no download. Scores: cosine distances of the run's best checkpoint on
# the test split, in percent.

# %% tags=["parameters"]
DATA_DIR = None  # a prepared DATA_DIR (`reident-submit prepare`); None: synthetic demo data under WORK_DIR
WORK_DIR = None  # runs, cached features and results (None: <repo>/runs/notebooks); re-runs reuse them
BUDGET = "ci"  # "ci": tiny ViT, seconds; "full": models/cpu-small.yaml; "pretrained": models/cpu-pretrained.yaml
THREADS = None  # torch threads (None: torch's default)

# %%
from submit import ablation

work = ablation.setup(WORK_DIR, THREADS)
data = ablation.data_dir(DATA_DIR, work, BUDGET)
query, gallery = ablation.split_rows(data)
weights = ablation.pretrained_weights(BUDGET, work)
print(f"data: {data} ({len(query)} queries x {len(gallery)} gallery); budget {BUDGET}; weights {weights}")

# %% [markdown]
# Zero-shot first (no training), then one run per starting point with the same recipe.

# %%
import pandas as pd

pretrained = ablation.recipe(BUDGET, [f"backbone.pretrained={weights}"])
zero = {"row": "zero-shot", **ablation.zero_shot(pretrained, data, query, gallery, work)}
runs = ablation.score_runs([{"backbone.pretrained": None}, {"backbone.pretrained": weights}], BUDGET, data, work,
                           query, gallery)
runs.insert(0, "row", ["scratch", "pre-trained"])
table = pd.concat([pd.DataFrame([zero]), runs.drop(columns=["backbone.pretrained"])], ignore_index=True)
ablation.save_table(table, work, "07_pretrained_vs_scratch")
table

# %%
fig, ax = ablation.new_figure()
ablation.dot_plot(ax, table, "row", title=f"zero-shot vs scratch vs pre-trained ({BUDGET} budget)")
ablation.save_plot(fig, work, "07_pretrained_vs_scratch");

# %% [markdown]
# On the real photos (`DATA_DIR` = the prepared `tgc_reid_data.zip`, `BUDGET = "pretrained"`) the same three
# rows are part of `scripts/real_benchmark.sh`'s table (mean and spread over seeds) in docs/benchmarks.md.
