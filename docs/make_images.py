"""Regenerate docs/images/tensorboard.png, what the quick-start leaves in TensorBoard, from its event files.

python examples/quickstart.py --epochs 40 --logdir /tmp/readme_logs
python docs/make_images.py /tmp/readme_logs/quickstart/version_0
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.image as mpimg
import matplotlib.pyplot as plt
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def main(log_dir: str) -> None:
    events = EventAccumulator(log_dir, size_guidance={"images": 0, "scalars": 0})
    events.Reload()

    def image(tag: str, index: int):
        return mpimg.imread(io.BytesIO(events.Images(tag)[index].encoded_image_string), format="png")

    fig, axes = plt.subplots(2, 3, figsize=(15, 8), layout="constrained")
    filters = "recipe/first_layer_visualizer/filters"
    for ax, index, title in ((axes[0, 0], 0, "first-layer filters at init"), (axes[1, 0], -1, "... after training")):
        ax.imshow(image(filters, index), interpolation="nearest")
        ax.set_title(f"{filters}: {title}", fontsize=9)
        ax.axis("off")
    for ax, tag in (
        (axes[0, 1], "recipe/prediction_dynamics_logger/trajectories"),
        (axes[0, 2], "recipe/overfit_one_batch/loss_curve"),
    ):
        ax.imshow(image(tag, -1))
        ax.set_title(tag, fontsize=9)
        ax.axis("off")
    ratio = events.Scalars("recipe/update_ratio_monitor/median_log10_ratio")
    axes[1, 1].plot([e.step for e in ratio], [e.value for e in ratio], marker=".")
    axes[1, 1].axhline(-3, color="gray", linestyle="--", label="1e-3 (CS231n)")
    axes[1, 1].set(title="recipe/update_ratio_monitor/median_log10_ratio", xlabel="step")
    axes[1, 1].legend()
    for tag, label in (
        ("recipe/prediction_dynamics_logger/accuracy", "accuracy"),
        ("recipe/prediction_dynamics_logger/churn", "churn"),
    ):
        series = events.Scalars(tag)
        axes[1, 2].plot([e.step for e in series], [e.value for e in series], marker=".", label=label)
    axes[1, 2].set(title="recipe/prediction_dynamics_logger/{accuracy, churn}", xlabel="step")
    axes[1, 2].legend()
    out = Path(__file__).parent / "images" / "tensorboard.png"
    fig.savefig(out, dpi=80)
    print(out)


if __name__ == "__main__":
    main(sys.argv[1])
