"""The evaluation's plots: reward against weight, reward against KL (with Best-of-N), the two-head grid."""

from __future__ import annotations

from pathlib import Path

DPI = 110


def plot(report: dict, out_dir: Path) -> None:
    """Write reward_vs_weight.png, reward_vs_kl.png and, with a two-head grid, grid.png to `out_dir`."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    _reward_vs_weight(plt, report, out_dir / "reward_vs_weight.png")
    _reward_vs_kl(plt, report, out_dir / "reward_vs_kl.png")
    if report["grid"]:
        _grid(plt, report, out_dir / "grid.png")


def _per_head_axes(plt, heads: list[str]):
    """A figure with one panel per head, in a row."""
    return plt.subplots(1, len(heads), figsize=(4.2 * len(heads), 3.6), squeeze=False)


def _save(plt, fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def _reward_vs_weight(plt, report: dict, path: Path) -> None:
    """Per steered head: every head's mean reward (± standard error) against that head's weight,
    the steered head's own reward opaque, the others faded."""
    heads = report["heads"]
    ws = report["config"]["weights"]
    fig, axes = _per_head_axes(plt, heads)
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
    _save(plt, fig, path)


def _reward_vs_kl(plt, report: dict, path: Path) -> None:
    """Per head: its mean reward against KL from the base, VAS at weights >= 0 and Best-of-N."""
    heads = report["heads"]
    fig, axes = _per_head_axes(plt, heads)
    for ax, h in zip(axes[0], heads):
        _kl_panel(ax, report, h)
    _save(plt, fig, path)


def _kl_panel(ax, report: dict, h: str) -> None:
    """Head `h`'s reward-KL curves; Best-of-N's starts at the base (KL 0), VAS's lowest weight >= 0."""
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


def _grid(plt, report: dict, path: Path) -> None:
    """The two-head grid: a heat map per head of its mean reward over both heads' weights."""
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
    _save(plt, fig, path)
