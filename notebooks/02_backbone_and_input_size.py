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
# # 02 · Backbone and input size
#
# **Question:** which image tower, at which input size (height x width of the letterboxed crop),
# gives the best retrieval for its training cost?
#
# Every variant is the budget's base recipe with `backbone.name` and `backbone.image_size` overridden
# (the rest of the recipe unchanged). Player crops are tall, so sizes are given as (height, width);
# crops are letterboxed (aspect kept, black padding). Scores: cosine distances of the best checkpoint on
# the test split, in percent; cost: training images/s and seconds.

# %% tags=["parameters"]
DATA_DIR = None  # a prepared DATA_DIR (`reident-submit prepare`); None: synthetic demo data under WORK_DIR
WORK_DIR = None  # runs, cached features and results (None: <repo>/runs/notebooks); re-runs reuse them
BUDGET = "ci"  # "ci": tiny random models, 1 epoch (seconds); "full": models/cpu-small.yaml (minutes per run)
THREADS = None  # torch threads (None: torch's default; 1 is fastest for the tiny "ci" models on a busy machine)
BACKBONES = None  # backbone names ("timm:<model>", "open_clip:<model>"); None: the budget's grid below
SIZES = None  # [[height, width], ...]; None: the budget's grid below

# %%
from submit import ablation

work = ablation.setup(WORK_DIR, THREADS)
data = ablation.data_dir(DATA_DIR, work, BUDGET)
query, gallery = ablation.split_rows(data)
grid = {
    "ci": (["open_clip:reident-tiny-vit", "timm:test_resnet"], [[32, 32], [64, 32]]),
    "full": (["timm:resnet18", "timm:resnet34", "timm:efficientnet_b0"], [[128, 64], [192, 96], [256, 128]]),
}[BUDGET]
backbones, sizes = BACKBONES or grid[0], SIZES or grid[1]
print(f"data: {data} ({len(query)} queries x {len(gallery)} gallery); budget {BUDGET}")

# %% [markdown]
# Train (or reuse) one run per (backbone, size) and score it.

# %%
variants = [{"backbone.name": b, "backbone.image_size": list(s)} for b in backbones for s in sizes]
table = ablation.score_runs(variants, BUDGET, data, work, query, gallery)
table = table.rename(columns={"backbone.name": "backbone"})
table.insert(1, "size", [f"{h}x{w}" for h, w in table.pop("backbone.image_size")])
ablation.save_table(table, work, "02_backbone_and_input_size")
table

# %%
fig, axes = ablation.new_figure(ncols=2)
labels = table["backbone"] + " @ " + table["size"]
ablation.dot_plot(axes[0], table.assign(variant=labels), "variant", title="retrieval (test split)")
axes[1].scatter(table["images_per_s"], table["mAP"])
for x, y, text in zip(table["images_per_s"], table["mAP"], labels):
    axes[1].annotate(text, (x, y), fontsize=8, xytext=(3, 3), textcoords="offset points")
axes[1].margins(x=0.3, y=0.15)
axes[1].set_xlabel("training images/s")
axes[1].set_ylabel("mAP (%)")
axes[1].set_title("accuracy vs training speed")
fig.suptitle(f"Backbone and input size ({BUDGET} budget)")
ablation.save_plot(fig, work, "02_backbone_and_input_size");

# %% [markdown]
# Pretrained CLIP towers (`models/vit-*.yaml`) need their weights on disk; pass them with `BACKBONES`
# only on a machine that has them (the "full" grid trains small CNNs from scratch, nothing to download).
