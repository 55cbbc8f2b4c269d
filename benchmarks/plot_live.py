"""Draw a run's live curves from its TensorBoard event files, as TensorBoard reads them (purges applied):
a check that what `tensorboard --logdir RUN_DIR/logs` shows is what the run wrote, without a browser.

    python benchmarks/plot_live.py RUN_DIR [OUT.png]     # default RUN_DIR/logs/live.png

One panel per tag: train/* against the global update step (a dotted line where an iteration starts),
then the per-iteration tags against the iteration.
"""

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

ITERATION_TAGS = ("iteration/parse_rate", "iteration/marker_rate", "iteration/judge_score", "iteration/pairs_trained",
                  "iteration/thought_chars", "iteration/response_chars", "stage_wall_s/sample", "stage_wall_s/train")


def read(folder: Path) -> dict:
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def main(run: Path, png: Path) -> None:
    train, iteration = read(run / "logs" / "train"), read(run / "logs" / "iteration")
    updates = iteration.get("iteration/updates", [])
    starts = [sum(v for _, v in updates[:i]) + 0.5 for i in range(1, len(updates))]  # iteration boundaries
    panels = [(tag, train[tag]) for tag in sorted(train)] + [(t, iteration[t]) for t in ITERATION_TAGS if t in iteration]
    cols = 4
    fig, axes = plt.subplots((len(panels) + cols - 1) // cols, cols, figsize=(4 * cols, 2.6 * ((len(panels) + cols - 1) // cols)))
    for ax, (tag, points) in zip(axes.flat, panels):
        steps, values = zip(*points)
        ax.plot(steps, values, marker="o" if len(points) < 10 else None, markersize=4)
        ax.set_title(tag, fontsize=10)
        ax.set_xlabel("update" if tag.startswith("train/") else "iteration", fontsize=8)
        if tag.startswith("train/"):
            for x in starts:
                ax.axvline(x, color="grey", linestyle=":", linewidth=1)
        else:
            ax.set_xticks(steps)
        ax.tick_params(labelsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(f"{run}: live metrics read back from logs/ (TensorBoard event files)", fontsize=11)
    fig.tight_layout()
    fig.savefig(png, dpi=90)
    print(f"{png}: {len(panels)} panels; {len(train.get('train/loss', []))} updates, {len(updates)} iterations")


if __name__ == "__main__":
    run = Path(sys.argv[1])
    main(run, Path(sys.argv[2]) if len(sys.argv) > 2 else run / "logs" / "live.png")
