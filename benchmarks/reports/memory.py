"""What ``benchmarks.memory`` prints and its plot, docs/results/memory-model.png."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.docs import MIB


def print_report(r: dict[str, Any]) -> None:
    m = r["machine"]
    print(f"machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}")
    print(f"model {r['model']} at max_seq {r['max_seq']}, allocator {r['allocator']}")
    print(
        f"probe: {r['probe_seconds']:.2f}s ({r['probe_method']}); "
        f"a = {r['fit']['a']:.0f} B/token, b = {r['fit']['b']:.2f} B/token^2, "
        f"c = {r['fit']['c']:.0f} B/pass"
    )
    print(
        f"model load: {r['model_load_seconds_cold']:.2f}s cold, "
        f"{r['model_load_seconds_warm']:.2f}s warm; cache-hit start "
        f"({r['cache_hit_status']}): {r['cache_hit_start_seconds']:.2f}s "
        f"(+{r['cache_hit_start_seconds'] - r['model_load_seconds_warm']:.2f}s over load)"
    )
    print(f"\n{'batch':>6} {'seq':>5} {'measured MiB':>13} {'predicted MiB':>14} {'error %':>8}")
    for h in r["held_out"]:
        print(
            f"{h['batch']:>6} {h['seq']:>5} {h['measured'] / MIB:>13.1f} "
            f"{h['predicted'] / MIB:>14.1f} {h['error_pct']:>8.1f}"
        )
    print(f"held-out max |error|: {r['held_out_max_abs_error_pct']:.1f}%")
    u = r["utilisation"]
    print(
        f"\nbatches from {u['texts']} mixed texts in a {u['workspace_bytes'] / MIB:.0f} MiB "
        f"workspace: {u['batches']} batches, predicted use {100 * u['predicted_share_mean']:.0f}% "
        f"mean / {100 * u['predicted_share_max']:.0f}% max; measured "
        f"{100 * u['measured_share_max']:.0f}% max"
    )


def plot(r: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 5))
    for points, label, marker in (
        (r["fit_points"], "probe shapes (fit)", "o"),
        (r["held_out"], "held-out shapes", "s"),
    ):
        ax.scatter(
            [p["predicted"] / MIB for p in points],
            [p["measured"] / MIB for p in points],
            label=label,
            marker=marker,
        )
        for p in points:
            ax.annotate(
                f"{p['batch']}x{p['seq']}",
                (p["predicted"] / MIB, p["measured"] / MIB),
                fontsize=7,
                xytext=(3, 3),
                textcoords="offset points",
            )
    top = max(max(p["measured"], p["predicted"]) for p in r["fit_points"] + r["held_out"]) / MIB
    ax.plot([0, top * 1.05], [0, top * 1.05], "k--", linewidth=0.8, label="measured = predicted")
    ax.set_xlabel("predicted peak above baseline (MiB)")
    ax.set_ylabel("measured peak above baseline (MiB)")
    ax.set_title(
        f"{r['model']}, max_seq {r['max_seq']}: W = {r['fit']['c'] / MIB:.1f} MiB + "
        f"{r['fit']['a']:.0f}·B·S + {r['fit']['b']:.1f}·B·S²",
        fontsize=9,
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
