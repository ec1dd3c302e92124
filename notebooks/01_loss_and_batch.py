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
# # 01 · InfoNCE vs batch-hard triplet, and the batch size
#
# **Question:** does the symmetric image-to-image InfoNCE loss of CLIP-ReIdent beat a batch-hard triplet
# loss on the same pair batches, and how does the number of pairs per batch (= negatives per anchor)
# change the result?
#
# Every variant is the budget's base recipe with `train.loss` and `train.pairs_per_batch` overridden,
# trained for the same number of epochs (so the same images are seen; bigger batches take fewer steps).
# Scores: cosine distances of the best checkpoint on the test split, in percent.

# %% tags=["parameters"]
DATA_DIR = None  # a prepared DATA_DIR (`reident-submit prepare`); None: synthetic demo data under WORK_DIR
WORK_DIR = None  # runs, cached features and results (None: <repo>/runs/notebooks); re-runs reuse them
BUDGET = "ci"  # "ci": tiny random ViT, 1 epoch (seconds); "full": models/cpu-small.yaml (minutes per run)
THREADS = None  # torch threads (None: torch's default; 1 is fastest for the tiny "ci" models on a busy machine)
LOSSES = ["infonce", "triplet"]
PAIRS = None  # pairs per batch to try; None: the budget's grid below

# %%
from submit import ablation

work = ablation.setup(WORK_DIR, THREADS)
data = ablation.data_dir(DATA_DIR, work, BUDGET)
query, gallery = ablation.split_rows(data)
pairs = PAIRS or {"ci": [4, 8], "full": [8, 16, 32, 64]}[BUDGET]
print(f"data: {data} ({len(query)} queries x {len(gallery)} gallery); budget {BUDGET}")

# %% [markdown]
# Train (or reuse) one run per (loss, pairs per batch) and score it.

# %%
variants = [{"train.loss": loss, "train.pairs_per_batch": p} for loss in LOSSES for p in pairs]
table = ablation.score_runs(variants, BUDGET, data, work, query, gallery)
table = table.rename(columns={"train.loss": "loss", "train.pairs_per_batch": "pairs_per_batch"})
ablation.save_table(table, work, "01_loss_and_batch")
table

# %%
fig, axes = ablation.new_figure(ncols=2)
for ax, metric in zip(axes, ["mAP", "rank1"]):
    for loss, part in table.groupby("loss", sort=False):
        ax.plot(part["pairs_per_batch"], part[metric], marker="o", label=loss)
    ax.set_xscale("log", base=2)
    ax.set_xticks(pairs, [str(p) for p in pairs])
    ax.set_xlabel("pairs per batch")
    ax.set_ylabel(f"{metric} (%)")
    ax.legend()
fig.suptitle(f"Loss and batch size ({BUDGET} budget, test split)")
ablation.save_plot(fig, work, "01_loss_and_batch");

# %% [markdown]
# Reading the table: compare the two losses at equal batch size, then each loss across batch sizes.
# With the "ci" budget the models are tiny and barely trained, so the numbers only show that the
# pipeline runs; use `BUDGET = "full"` (or a real DATA_DIR) for conclusions.
