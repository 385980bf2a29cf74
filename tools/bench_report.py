"""The report of `tools/bench all`: docs/BENCHMARKS.md and its chart.

The file is generated whole from one run.  Readings written by hand live
below the READINGS line and are kept when the file is generated again; the
dated sections of earlier single benchmarks are in BENCHMARKS-HISTORY.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

READINGS = (
    "<!-- Readings by hand: everything below this line is kept when "
    "`tools/bench all --write` runs again. -->"
)


@dataclass(frozen=True)
class Target:
    """A ratio an issue asks for, and what the run measured."""

    what: str
    issue: int
    measured: float
    wanted: float
    at_most: bool = False  # the ratio must stay below `wanted`, not reach it

    @property
    def met(self) -> bool:
        return self.measured <= self.wanted if self.at_most else self.measured >= self.wanted

    def row(self) -> str:
        bound = "at most" if self.at_most else "at least"
        verdict = "met" if self.met else "**missed**"
        return (
            f"| {self.what} | #{self.issue} | {bound} {self.wanted:g}x "
            f"| {self.measured:.3g}x | {verdict} |"
        )


def targets_table(targets: list[Target]) -> list[str]:
    return [
        "| target | issue | wanted | measured | |",
        "| --- | --- | --- | --- | --- |",
        *(t.row() for t in targets),
    ]


def ratio_table(
    kinds: tuple[str, ...],
    workloads: dict[str, str],
    runs: dict[str, list[dict[str, float]]],
    med: dict[str, dict[str, float]],
) -> list[str]:
    """Workload rows: each kind's median (its runs in brackets), then the
    first kind's ratio to each of the others."""
    first, others = kinds[0], kinds[1:]
    head = [*kinds, *(f"{first} / {k}" for k in others)]
    out = ["| workload | " + " | ".join(head) + " |", "| --- |" + " --- |" * len(head)]
    for w, unit in workloads.items():
        cells = [
            f"{_num(med[k][w])} {unit} ({', '.join(_num(r[w]) for r in runs[k])})" for k in kinds
        ]
        ratios = [f"{med[first][w] / med[k][w]:.2f}" for k in others]
        out.append(f"| {w} | " + " | ".join(cells + ratios) + " |")
    return out


def _num(x: float) -> str:
    return f"{x:.0f}" if abs(x) >= 10 else f"{x:.2f}"


def chart(
    path: Path,
    workloads: list[str],
    med: dict[str, dict[str, float]],
    kinds: tuple[str, str, str],
    targets: list[Target],
) -> None:
    """Two panels: sharedfs and ext4 against the passthrough, per one-host
    workload (log scale, the passthrough at 1); each target's measured
    ratio over the one wanted (1 is the target; right of it is met)."""
    import matplotlib

    matplotlib.use("Agg")  # no display: write the file only
    import matplotlib.pyplot as plt

    ours, ceiling, kernel = kinds
    fig, (left, right) = plt.subplots(
        1, 2, figsize=(13, 0.32 * len(workloads) + 2.5), width_ratios=(3, 2)
    )
    ys = list(range(len(workloads)))[::-1]
    for off, kind, color in ((-0.2, ours, "tab:blue"), (0.2, kernel, "tab:gray")):
        left.barh(
            [y + off for y in ys],
            [med[kind][w] / med[ceiling][w] for w in workloads],
            height=0.4,
            color=color,
            label=f"{kind} / {ceiling}",
        )
    left.set_xscale("log")
    left.axvline(1.0, color="black", linewidth=0.8)
    left.set_yticks(ys, workloads, fontsize=8)
    left.set_xlabel(f"rate relative to {ceiling} (log scale; higher is faster)")
    left.legend(loc="lower right", fontsize=8)
    left.set_title("one host")

    ty = list(range(len(targets)))[::-1]
    scores = [(t.wanted / t.measured if t.at_most else t.measured / t.wanted) for t in targets]
    right.barh(ty, scores, color=["tab:green" if t.met else "tab:red" for t in targets])
    right.axvline(1.0, color="black", linewidth=0.8)
    right.set_yticks(ty, [f"#{t.issue} {t.what}" for t in targets], fontsize=8)
    right.set_xscale("log")
    right.set_xlabel("measured / wanted (1 = the target; green: met)")
    right.set_title("targets")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(path: Path, text: str) -> None:
    """`text` as the file, keeping the readings below READINGS if it has them."""
    kept = ""
    if path.exists():
        old = path.read_text()
        if READINGS in old:
            kept = old.split(READINGS, 1)[1]
    path.write_text(text.rstrip("\n") + "\n\n" + READINGS + (kept or "\n"))
