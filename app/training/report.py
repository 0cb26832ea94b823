"""Write report.json and report.png for a model directory."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def write_report(model_dir: Path, evaluation: dict[str, Any], calibration: dict[str, Any]) -> None:
    model_dir = Path(model_dir)
    report = {"evaluation": evaluation, "calibration": calibration}
    (model_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")

    L = evaluation["num_layers"]
    fig, ax = plt.subplots(1, 3, figsize=(15, 4.2))
    curve = evaluation["global_threshold_curve"]
    ax[0].plot(
        [c["mean_layers"] for c in curve],
        [100 * c["accuracy"] for c in curve],
        "o-",
        ms=3,
        label="one global threshold",
    )
    ax[0].plot(
        [evaluation["mean_layers"]],
        [100 * evaluation["adaptive_accuracy"]],
        "r*",
        ms=14,
        label="calibrated per-exit thresholds",
    )
    ladder = evaluation.get("operating_ladder", [])
    if ladder:
        ax[0].plot(
            [p["mean_layers"] for p in ladder],
            [100 * p["accuracy"] for p in ladder],
            "s",
            color="tab:orange",
            ms=7,
            mfc="none",
            label="operating ladder (points 0, 1, ...) under load",
        )
        for p in ladder:
            ax[0].annotate(
                str(p["point"]),
                (p["mean_layers"], 100 * p["accuracy"]),
                textcoords="offset points",
                xytext=(0, -13),
                ha="center",
                fontsize=7,
                color="tab:orange",
            )
    ax[0].axhline(100 * evaluation["final_accuracy"], color="gray", ls="--", label="last exit")
    ax[0].set(
        xlabel="mean layers executed",
        ylabel="accuracy (%)",
        title=f"accuracy vs depth ({evaluation['split']} split)",
    )
    ax[0].legend(fontsize=8)
    exits = list(range(1, L + 1))
    ax[1].bar(exits, [100 * a for a in evaluation["per_exit_accuracy"]], color="tab:blue")
    ax[1].set(
        xlabel="exit (after layer)",
        ylabel="accuracy (%)",
        title="accuracy of each exit",
        ylim=(max(0, 100 * min(evaluation["per_exit_accuracy"]) - 10), 100),
    )
    hist = evaluation["exit_histogram"]
    ax[2].bar(exits, [100 * h / max(1, sum(hist)) for h in hist], color="tab:green")
    ax[2].set(
        xlabel="exit layer",
        ylabel="inputs (%)",
        title=f"where inputs leave (mean {evaluation['mean_layers']:.2f} of {L})",
    )
    fig.suptitle(f"{evaluation['model']} ({evaluation['quantization']}, {evaluation['device']})")
    fig.tight_layout()
    fig.savefig(model_dir / "report.png", dpi=80)
    plt.close(fig)
