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
# # 06 · The shirt-number ranking step
#
# **Question:** does the shirt-number step (`jersey.number_agreement`: distance minus a bonus where both
# crops confidently show the same number, plus a penalty where they confidently differ) improve the
# ranking, and how good must the number reader be?
#
# Base distances: cosine distances of the budget's base run on the test split. Numbers come from
# - a simulated reader built from the true numbers (`numbers.csv`, written by the synthetic generator)
#   with a share of crops misread, either confidently ("confident wrong") or with a low probability
#   that the threshold filters out ("flagged": a calibrated reader);
# - the zero-shot CLIP reader (`READER_MODEL`/`READER_PRETRAINED`). Without downloadable weights the
#   default is the tiny RANDOM CLIP: it is never confident, so the step leaves the ranking unchanged.
# On a real DATA_DIR without `numbers.csv` only the zero-shot rows are computed.

# %% tags=["parameters"]
DATA_DIR = None  # a prepared DATA_DIR (`reident-submit prepare`); None: synthetic demo data under WORK_DIR
WORK_DIR = None  # runs, cached features and results (None: <repo>/runs/notebooks); re-runs reuse them
BUDGET = "ci"  # "ci": tiny random ViT, 1 epoch (seconds); "full": models/cpu-small.yaml (minutes per run)
THREADS = None  # torch threads (None: torch's default; 1 is fastest for the tiny "ci" models on a busy machine)
NOISE = [0.0, 0.1, 0.3, 0.5]  # share of crops the simulated reader misreads
BONUS, PENALTY, THRESHOLD = 0.1, 0.1, 0.5  # the step's parameters
READER_MODEL = "reident-tiny-vit"  # open_clip model of the zero-shot reader (e.g. ViT-L-14 with real weights)
READER_PRETRAINED = None  # its weights (open_clip tag, hf-hub:..., or a file); None: random (a no-op check)

# %%
import pandas as pd

from submit import ablation, jersey

work = ablation.setup(WORK_DIR, THREADS)
data = ablation.data_dir(DATA_DIR, work, BUDGET)
query, gallery = ablation.split_rows(data)
run = ablation.ensure_run(ablation.recipe(BUDGET), data, work)
q, g = ablation.split_features(run, data, query, gallery, work)
dist = ablation.cosine(q, g)
paths = [*query["path"], *gallery["path"]]
truth_file = data / "numbers.csv"
truth = jersey.match_truth(paths, jersey.read_truth(truth_file)) if truth_file.is_file() else None
nq = len(query)
print(f"data: {data} ({nq} queries x {len(gallery)} gallery); run {run.name}; "
      f"true numbers: {'numbers.csv' if truth is not None else 'none (oracle rows skipped)'}")


def step(numbers, probs):
    """The ranking step on the base distances with one reader's numbers and probabilities."""
    return jersey.number_agreement(dist, numbers[:nq], probs[:nq], numbers[nq:], probs[nq:], BONUS, PENALTY, THRESHOLD)


# %%
rows = [{"numbers_from": "no step", "noise": None, **ablation.score(dist, query, gallery)}]
reader = {"model": READER_MODEL, "pretrained": READER_PRETRAINED, "bonus": BONUS, "penalty": PENALTY,
          "threshold": THRESHOLD}
zero_shot = jersey.apply_jersey(dist, query, gallery, data, reader, progress=False)
rows.append({"numbers_from": f"zero-shot {READER_MODEL}", "noise": None, **ablation.score(zero_shot, query, gallery)})
if truth is not None:
    for flagged in (False, True):
        for noise in NOISE:
            numbers, probs = ablation.noisy_oracle(truth, noise, flagged)
            kind = "flagged" if flagged else "confident wrong"
            rows.append({"numbers_from": f"oracle ({kind})", "noise": noise,
                         **ablation.score(step(numbers, probs), query, gallery)})
table = pd.DataFrame(rows)
table["mAP_gain"] = (table["mAP"] - table["mAP"].iloc[0]).round(2)
ablation.save_table(table, work, "06_shirt_numbers")
table

# %%
fig, ax = ablation.new_figure()
for name, part in table[table["noise"].notna()].groupby("numbers_from", sort=False):
    ax.plot(100 * part["noise"].astype(float), part["mAP"], marker="o", label=name)
ax.axhline(table["mAP"].iloc[0], color="black", linestyle="--", label="no step")
ax.axhline(table["mAP"].iloc[1], color="grey", linestyle=":", label=table["numbers_from"].iloc[1])
ax.set_xlabel("misread crops (%)")
ax.set_ylabel("mAP (%)")
ax.legend()
ax.set_title(f"Shirt-number step, bonus {BONUS} / penalty {PENALTY} ({BUDGET} budget, test split)")
ablation.save_plot(fig, work, "06_shirt_numbers");
