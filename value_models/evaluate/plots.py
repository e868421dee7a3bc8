"""The evaluation's plots: reward against weight, reward against KL (with Best-of-N), the two-head grid."""

from __future__ import annotations

from pathlib import Path


def plot(report: dict, out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    heads = report["heads"]
    ws = report["config"]["weights"]
    fig, axes = plt.subplots(1, len(heads), figsize=(4.2 * len(heads), 3.6), squeeze=False)
    for ax, h in zip(axes[0], heads):
        rows = report["per_head"][h]
        for x in heads:
            m = [r["reward"][x][0] for r in rows]
            se = [r["reward"][x][1] for r in rows]
            ax.errorbar(ws, m, yerr=se, marker="o", capsize=3, label=f"reward {x}", alpha=1.0 if x == h else 0.4)
        ax.set_title(f"steering {h}")
        ax.set_xlabel(f"weight of {h}")
        ax.set_ylabel("mean reward")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "reward_vs_weight.png", dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(heads), figsize=(4.2 * len(heads), 3.6), squeeze=False)
    for ax, h in zip(axes[0], heads):
        rows = sorted(report["per_head"][h], key=lambda r: r["weights"].get(h, 0.0))
        rows = [r for r in rows if r["weights"].get(h, 0.0) >= 0]
        ax.plot([r["kl"][0] for r in rows], [r["reward"][h][0] for r in rows], "o-", label="VAS")
        for r in rows:
            ax.annotate(f"w={r['weights'].get(h, 0.0):g}", (r["kl"][0], r["reward"][h][0]), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
        bon = report["bon"]
        base0 = rows[0]["reward"][h][0] if rows else None
        xs = [0.0] + [r["kl"] for r in bon.values()]
        ys = [base0] + [r["reward"][h][0] for r in bon.values()]
        ax.plot(xs, ys, "s--", label="Best-of-N")
        for n, r in bon.items():
            ax.annotate(f"N={n}", (r["kl"], r["reward"][h][0]), fontsize=7, xytext=(3, -9), textcoords="offset points")
        ax.set_title(h)
        ax.set_xlabel("KL from base (nats)")
        ax.set_ylabel(f"mean reward {h}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "reward_vs_kl.png", dpi=110)
    plt.close(fig)

    if report["grid"]:
        a, b = report["grid_heads"]
        gw = report["config"]["grid_weights"]
        fig, axes = plt.subplots(1, 2, figsize=(8.4, 3.6))
        for ax, h in zip(axes, (a, b)):
            m = [[r["reward"][h][0] for r in row] for row in report["grid"]]
            im = ax.imshow(m, origin="lower", cmap="viridis")
            ax.set_xticks(range(len(gw)), [f"{w:g}" for w in gw])
            ax.set_yticks(range(len(gw)), [f"{w:g}" for w in gw])
            ax.set_xlabel(f"weight of {b}")
            ax.set_ylabel(f"weight of {a}")
            ax.set_title(f"mean reward {h}")
            for i, row in enumerate(m):
                for j, v in enumerate(row):
                    ax.text(j, i, f"{v:.3f}", ha="center", va="center", color="w", fontsize=8)
            fig.colorbar(im, ax=ax)
        fig.tight_layout()
        fig.savefig(out_dir / "grid.png", dpi=110)
        plt.close(fig)
