"""Plot recorded bench runs as fractions of dense SDPA, against issue 5's targets (CPU is enough).

    python -m experiments.plot_record RUN.json [RUN.json ...] [--variant segment_local/sdpa]
        [--out record.png]

Reads the JSON files ``experiments.bench`` wrote (each with its own dense SDPA row), so the README's
headline plot is one command over the recorded files, not a notebook cell. Three panels over the
sequence length (log scale): the forward's and the forward+backward's useful TFLOP/s over dense
SDPA's in the same run (single calls solid, calls back to back dotted, and where the run had
``bench --graphs``, replays from CUDA graphs against dense SDPA's dash-dotted), with the targets
0.90 and 0.85; and the peak memory over the tensors the call cannot avoid, with the bounds 1.1 and
1.2. One colour per (mixing, causal). Each ratio is taken within its own run, so files from
several runs of one GPU may be combined (the title names them); files from different GPUs, or two
files with the same row, are refused. Prints the plotted ratios as a table last.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from experiments import data_range, make_out
from experiments.ablate import to_markdown

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.lines import Line2D

# Issue 5's bounds: (forward, forward+backward) throughput fractions and peak-memory ratios.
TARGETS = {"fwd_vs_dense": 0.90, "fwdbwd_vs_dense": 0.85}
MEMORY_BOUNDS = {"fwd_mem_vs_io": 1.1, "fwdbwd_mem_vs_io": 1.2}
Key = tuple[str, bool, int]  # (mixing, causal, n)
# single calls, back to back, replayed from CUDA graphs (bench --graphs: against dense replayed)
STYLES: dict[str, dict[str, Any]] = {
    "": {"marker": "o"},
    "_b2b": {"ls": ":"},
    "_graph": {"ls": "-."},
}


def load(paths: list[Path], variant: str) -> tuple[dict[Key, dict[str, Any]], str]:
    """The ``variant``'s rows of every file by (mixing, causal, n), and where they ran (the GPU,
    and each torch version met). Raises ``ValueError`` naming the file for anything that is not
    one GPU's distinct rows."""
    rows: dict[Key, dict[str, Any]] = {}
    source: dict[Key, Path] = {}
    devices: dict[str, Path] = {}
    torches: dict[str, None] = {}
    for path in paths:
        try:
            record = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path}: not a readable bench JSON file ({exc})") from None
        if not isinstance(record, dict) or not isinstance(record.get("rows"), list):
            raise ValueError(f"{path}: not a bench JSON file (no 'rows' list)")
        device = str(record.get("meta", {}).get("device", "unknown device"))
        torches[str(record.get("meta", {}).get("torch", "unknown"))] = None
        devices.setdefault(device, path)
        if len(devices) > 1:
            first, second = devices.items()
            raise ValueError(
                f"{first[1]} ran on {first[0]} and {second[1]} on {second[0]}: "
                "ratios of different GPUs do not go on one plot"
            )
        picked = [row for row in record["rows"] if row.get("variant") == variant]
        if not picked:
            found = sorted({str(row.get("variant")) for row in record["rows"]})
            raise ValueError(f"{path}: no {variant!r} rows (it has {found}); see --variant")
        for row in picked:
            key = (row["mixing"], bool(row["causal"]), int(row["n"]))
            if key in rows:
                raise ValueError(
                    f"{path} and {source[key]} both hold {variant!r} at n={key[2]}, "
                    f"mixing={key[0]}, causal={key[1]}: give one of them"
                )
            rows[key], source[key] = row, path
    return rows, f"one {next(iter(devices))}, torch {' / '.join(torches)}"


def _ratio(row: dict[str, Any], key: str) -> float | None:
    value = row.get(key)
    return float(value) if isinstance(value, (int, float)) and value > 0 else None


def mark(ax: Axes, level: float, text: str, ls: str = "-") -> Line2D:
    """A black horizontal line at ``level``, named in the panel's legend."""
    return ax.axhline(level, color="k", ls=ls, lw=1, label=text)


def plot_formats() -> set[str]:
    """The file suffixes matplotlib writes (png, pdf, svg, ...)."""
    from matplotlib.backend_bases import FigureCanvasBase

    return set(FigureCanvasBase.get_supported_filetypes())


def plot(rows: dict[Key, dict[str, Any]], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(mixing, causal) for mixing, causal, _ in rows})
    fig, axes = plt.subplots(1, 3, figsize=(17, 5.2))
    panels = (
        ("fwd_vs_dense", "forward: useful TFLOP/s / dense SDPA's"),
        ("fwdbwd_vs_dense", "forward+backward: useful TFLOP/s / dense SDPA's"),
    )
    for i, (mixing, causal) in enumerate(groups):
        color = f"C{i % 10}"
        label = f"{mixing}, {'causal' if causal else 'non-causal'}"
        ns = sorted(n for m, c, n in rows if (m, c) == (mixing, causal))
        group = [rows[(mixing, causal, n)] for n in ns]
        for ax, (key, _) in zip(axes, panels):
            for suffix, style in STYLES.items():
                xy = [(n, r) for n, row in zip(ns, group) if (r := _ratio(row, key + suffix))]
                if xy:
                    tag = label + {"": "", "_b2b": ", back to back", "_graph": ", replayed"}[suffix]
                    ax.plot(*zip(*xy), color=color, label=tag, **style)
        for key, fmt in (("fwd_mem_vs_io", "o-"), ("fwdbwd_mem_vs_io", "s--")):
            xy = [(n, r) for n, row in zip(ns, group) if (r := _ratio(row, key))]
            if xy:
                tag = f"{label}, {'forward' if key.startswith('fwd_') else 'fwd+bwd'}"
                axes[2].plot(*zip(*xy), fmt, color=color, label=tag)
    targets = [
        mark(ax, TARGETS[key], f"target {TARGETS[key]:.2f}") for ax, (key, _) in zip(axes, panels)
    ]
    for ax, (_, name) in zip(axes, panels):
        ax.set_title(name, fontsize=10)
        ax.set_ylim(0, max(1.15, 1.05 * data_range(ax)[1]))
    axes[2].set_title("peak memory / (q, k, v, out [, their gradients])", fontsize=10)
    for (key, bound), ls in zip(MEMORY_BOUNDS.items(), ("-", "--")):
        mark(
            axes[2],
            bound,
            f"bound {bound} ({'forward' if key.startswith('fwd_') else 'fwd+bwd'})",
            ls,
        )
    low, high = data_range(axes[2])
    axes[2].set_ylim(min(0.95, low - 0.02), max(1.45, high + 0.05))
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length n")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7, loc="lower right")
    axes[1].legend(handles=[targets[1]], fontsize=7, loc="lower right")  # (the same colours)
    axes[2].legend(fontsize=7, loc="upper right", ncol=2)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(rows: dict[Key, dict[str, Any]]) -> str:
    """The plotted ratios: single calls, back to back in parentheses, replayed from CUDA graphs
    in brackets."""

    def cell(row: dict[str, Any], key: str) -> str:
        single, b2b, graph = (_ratio(row, key + suffix) for suffix in STYLES)
        text = f"{single:.3f}" if single else "—"
        text += f" ({b2b:.3f})" if b2b else ""
        return text + (f" [{graph:.3f}]" if graph else "")

    body = [
        [str(n), mixing, str(causal), cell(row, "fwd_vs_dense"), cell(row, "fwdbwd_vs_dense")]
        for (mixing, causal, n), row in sorted(rows.items(), key=lambda kv: (kv[0][2], kv[0][:2]))
    ]
    return to_markdown(["n", "mixing", "causal", "fwd x dense", "fwd+bwd x dense"], body)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "files", nargs="+", type=Path, help="bench JSON files (experiments.bench --out's)"
    )
    parser.add_argument(
        "--variant",
        default="segment_local/sdpa",
        help="the bench row plotted (default: %(default)s)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("record.png"),
        help="the figure written, its format from the suffix (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    try:
        rows, where = load(args.files, args.variant)
    except ValueError as exc:
        parser.error(str(exc))
    formats = plot_formats()
    if args.out.suffix.lstrip(".").lower() not in formats:  # (no suffix: matplotlib added .png)
        parser.error(f"--out must end in one of .{', .'.join(sorted(formats))}, got {args.out}")
    make_out(parser, args.out.parent)
    names = ", ".join(path.name for path in args.files)
    plot(rows, f"{args.variant} on {where}; each ratio within its own run ({names})", args.out)
    print(f"wrote {args.out}\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
