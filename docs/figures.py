"""Regenerate the pictures of ``docs/semantics.md`` under ``docs/img/`` and ``docs/catalog.md``.

    python docs/figures.py            # PNGs + catalog
    python docs/figures.py --ascii    # also print the ASCII pictures used in docs/semantics.md

Every picture is drawn from the library itself (``ringattn.reference.selection`` /
``multiplicity`` and ``ringattn.dilation.global_permutation``), never from a re-implementation,
so a change to the definition shows up here. Masks are small pure functions of integers, drawn
as grids in the attention-gym style: one cell per (query, key) or (head, position).
(``docs/img/flex_*`` belong to ``docs/flex.md`` and are drawn by ``docs/flex_figures.py``.)
"""

from __future__ import annotations

import argparse
import inspect
import itertools
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless, deterministic
import matplotlib.pyplot as plt
import torch
from matplotlib.colors import BoundaryNorm, ListedColormap
from matplotlib.patches import Patch

import ringattn
from ringattn import reference, registry
from ringattn.communicators.sequence_parallel import causal_owners
from ringattn.dilation import global_permutation

DOCS = Path(__file__).resolve().parent
IMG = DOCS / "img"
REPO = DOCS.parent

# The running example of docs/semantics.md.
N, H = 32, 4
SEGMENT_LENGTHS = (8, 16, 32)
DILATION_RATES = (1, 2, 4)

# Small example for the ASCII pictures: the second config has a partial tail (12 = 8 + 4).
SMALL = {"n": 12, "h": 2, "segment_lengths": (4, 8), "dilation_rates": (1, 2)}

# Offset colours (offset o -> colour o + 1); 0 is "not selected", -1 "head does not use config".
OFFSET_COLORS = ["#4C72B0", "#DD8452", "#55A868", "#C44E52"]
UNUSED, EMPTY = "#d9d9d9", "#ffffff"
MULT_COLORS = ["#ffffff", "#c6dbef", "#6baed6", "#08519c"]  # m = 0, 1, 2, 3

# PNGs carry no timestamp / version, so regenerating unchanged figures leaves git clean.
SAVE = {"dpi": 110, "bbox_inches": "tight", "metadata": {"Software": None}}


# --------------------------------------------------------------------------------------------
# pure pattern functions (integers in, tensors out)
# --------------------------------------------------------------------------------------------


def offsets_table(h, segment_lengths, dilation_rates, mixing):
    """``off[i][head]``: the row offset ``head`` uses in config ``i``; None = config unused."""
    configs = tuple(zip(segment_lengths, dilation_rates))
    return [
        [reference.head_config_offset(h, configs, mixing, head, i) for head in range(h)]
        for i in range(len(configs))
    ]


def selection_by_offset(n, h, segment_lengths, dilation_rates, mixing):
    """``[k, h, n]`` ints: offset + 1 where selected, 0 where not, -1 where the head skips i."""
    sel = reference.selection(n, h, segment_lengths, dilation_rates, mixing)
    out = torch.zeros(sel.shape, dtype=torch.long)
    for i, row in enumerate(offsets_table(h, segment_lengths, dilation_rates, mixing)):
        for head, off in enumerate(row):
            out[i, head] = -1 if off is None else sel[i, head].long() * (off + 1)
    return out


def config_runs(n, h, w, r, mixing_offsets, causal=False):
    """``[n, n]`` ints for one config: offset + 1 where some head (with that offset) lets query
    ``p`` see key ``p'`` in this config, else 0. Built from ``reference.multiplicity`` of the
    config alone, so it is exactly what the definition attends to."""
    m = reference.multiplicity(n, h, (w,), (r,), causal=causal)  # lse: head uses off = head % r
    out = torch.zeros(n, n, dtype=torch.long)
    for head in range(h):
        off = mixing_offsets[head]
        if off is not None:
            out = torch.where(m[head] > 0, torch.full_like(out, off + 1), out)
    return out


# --------------------------------------------------------------------------------------------
# drawing
# --------------------------------------------------------------------------------------------


def draw_grid(ax, img, cmap, norm, cell_lines=True):
    ax.imshow(img, cmap=cmap, norm=norm, interpolation="nearest", aspect="equal")
    rows, cols = img.shape
    if cell_lines:  # thin white cell borders: one square per (query, key) / (head, position)
        ax.set_xticks([x - 0.5 for x in range(1, cols)], minor=True)
        ax.set_yticks([y - 0.5 for y in range(1, rows)], minor=True)
        ax.grid(which="minor", color="white", linewidth=0.4)
        ax.tick_params(which="minor", length=0)


def boundaries(ax, every, size, axis="both", color="black", lw=0.9):
    for x in range(every, size, every):
        if axis in ("both", "x"):
            ax.axvline(x - 0.5, color=color, linewidth=lw)
        if axis in ("both", "y"):
            ax.axhline(x - 0.5, color=color, linewidth=lw)


def run_starts(perm, w, r):
    """Permuted indices where a new (segment, residue) run starts (excluding 0)."""
    keys = [(int(x) // w, (int(x) % w) % r) for x in perm]
    return [j for j in range(1, len(keys)) if keys[j] != keys[j - 1]]


def lines_at(ax, where, color="0.55", lw=0.6):
    for x in where:
        ax.axvline(x - 0.5, color=color, linewidth=lw)
        ax.axhline(x - 0.5, color=color, linewidth=lw)


def offset_cmap():
    cmap = ListedColormap([UNUSED, EMPTY, *OFFSET_COLORS])
    return cmap, BoundaryNorm([-1.5, -0.5, 0.5, 1.5, 2.5, 3.5, 4.5], cmap.N)


def offset_legend(fig, with_unused):
    handles = [Patch(color=c, label=f"offset {o}") for o, c in enumerate(OFFSET_COLORS)]
    handles.append(Patch(facecolor=EMPTY, edgecolor="0.5", label="not selected"))
    if with_unused:
        handles.append(Patch(color=UNUSED, label="head does not use config"))
    fig.legend(
        handles=handles, loc="outside lower center", ncol=len(handles), frameon=False, fontsize=9
    )


def fig_selection(mixing):
    """(a) Which positions each head selects in each config."""
    img = selection_by_offset(N, H, SEGMENT_LENGTHS, DILATION_RATES, mixing)
    cmap, norm = offset_cmap()
    k = len(SEGMENT_LENGTHS)
    fig, axes = plt.subplots(k, 1, figsize=(8, 1.05 * k + 1.0), layout="constrained")
    for i, ax in enumerate(axes):
        w, r = SEGMENT_LENGTHS[i], DILATION_RATES[i]
        draw_grid(ax, img[i].numpy(), cmap, norm)
        boundaries(ax, w, N, axis="x")  # segment boundaries
        ax.set_title(f"config {i}: w={w}, r={r}", fontsize=10, loc="left")
        ax.set_yticks(range(H), [f"head {hd}" for hd in range(H)], fontsize=8)
        ax.set_xticks(range(0, N, 4), [str(x) for x in range(0, N, 4)], fontsize=8)
    axes[-1].set_xlabel("position p  (black lines: segment boundaries)", fontsize=9)
    fig.suptitle(f'selected positions, mixing="{mixing}"  (n={N}, h={H})', fontsize=11)
    offset_legend(fig, with_unused=(mixing == "head_groups"))
    return fig


def fig_multiplicity(mixing):
    """(b) m(p, p') per head, non-causal and causal."""
    cmap = ListedColormap(MULT_COLORS)
    norm = BoundaryNorm([-0.5, 0.5, 1.5, 2.5, 3.5], cmap.N)
    fig, axes = plt.subplots(2, H, figsize=(2.9 * H, 7.0), layout="constrained")
    for row, causal in enumerate((False, True)):
        m = reference.multiplicity(N, H, SEGMENT_LENGTHS, DILATION_RATES, causal, mixing)
        for head in range(H):
            ax = axes[row, head]
            draw_grid(ax, m[head].numpy(), cmap, norm)
            boundaries(ax, SEGMENT_LENGTHS[0], N, color="0.6", lw=0.6)
            ax.set_title(f"head {head}" + (", causal" if causal else ""), fontsize=10)
            ax.set_xticks(range(0, N, 8))
            ax.set_yticks(range(0, N, 8))
            ax.tick_params(labelsize=8)
            if head == 0:
                ax.set_ylabel("query p", fontsize=9)
            if row == 1:
                ax.set_xlabel("key p'", fontsize=9)
    fig.suptitle(
        f"multiplicity m(p, p') = number of configs that let p see p', mixing=\"{mixing}\"\n"
        f"n={N}, segment_lengths={SEGMENT_LENGTHS}, dilation_rates={DILATION_RATES}",
        fontsize=11,
    )
    handles = [
        Patch(facecolor=c, edgecolor="0.5", label=f"m = {v}") for v, c in enumerate(MULT_COLORS)
    ]
    fig.legend(handles=handles, loc="outside lower center", ncol=4, frameon=False, fontsize=9)
    return fig


def fig_global_permutation():
    """(c) each config alone, in sequence order and after ``global_permutation(n, w, r)``."""
    cmap, norm = offset_cmap()
    k = len(SEGMENT_LENGTHS)
    table = offsets_table(H, SEGMENT_LENGTHS, DILATION_RATES, "lse")
    fig, axes = plt.subplots(2, k, figsize=(3.6 * k, 8.4), layout="constrained")
    fig.get_layout_engine().set(h_pad=0.15)  # room between a row's ticks and the next titles
    for i, (w, r) in enumerate(zip(SEGMENT_LENGTHS, DILATION_RATES)):
        runs = config_runs(N, H, w, r, table[i])
        perm = global_permutation(N, w, r)
        permuted = runs[perm][:, perm]  # row and column order: the permuted sequence
        heads_of = {o: [hd for hd in range(H) if table[i][hd] == o] for o in sorted(set(table[i]))}
        who = "; ".join(f"off {o}: heads {','.join(map(str, hs))}" for o, hs in heads_of.items())
        for row, (img, order) in enumerate(((runs, "sequence"), (permuted, "permuted"))):
            ax = axes[row, i]
            draw_grid(ax, img.numpy(), cmap, norm)
            # segments in sequence order; (segment, residue) runs in permuted order
            if row == 0:
                boundaries(ax, w, N, color="0.55", lw=0.6)
            else:
                lines_at(ax, run_starts(perm, w, r))
            title = f"w={w}, r={r}, {order} order"
            ax.set_title(title if row else f"{title}\n({who})", fontsize=9)
            ticks = range(0, N, 8)
            # permuted panels: tick labels give the *position* sitting at that permuted index
            labels = [str(x) for x in ticks] if row == 0 else [str(int(perm[x])) for x in ticks]
            ax.set_xticks(ticks, labels)
            ax.set_yticks(ticks, labels)
            ax.tick_params(labelsize=8)
    axes[0, 0].set_ylabel("query p  (columns: key p')", fontsize=9)
    axes[1, 0].set_ylabel("permuted (tick labels: position)", fontsize=9)
    fig.suptitle(
        f'one config at a time, mixing="lse", n={N}, h={H}: after the permutation every\n'
        "(segment, residue) pair is one contiguous run, so attention is block-diagonal",
        fontsize=11,
    )
    offset_legend(fig, with_unused=False)
    return fig


def fig_tail():
    """A partial tail: n=20 with w=8, r=2 (segments [0,8), [8,16), tail [16,20))."""
    n, h, w, r = 20, 2, 8, 2
    table = offsets_table(h, (w,), (r,), "lse")
    cmap, norm = offset_cmap()
    runs = config_runs(n, h, w, r, table[0], causal=True)
    perm = global_permutation(n, w, r)
    fig, axes = plt.subplots(1, 2, figsize=(7.4, 4.8), layout="constrained")
    for ax, img, title in (
        (axes[0], runs, "sequence order"),
        (axes[1], runs[perm][:, perm], "global_permutation order"),
    ):
        draw_grid(ax, img.numpy(), cmap, norm)
        ax.set_title(title, fontsize=10)
        ax.set_xticks(range(0, n, 4))
        ax.set_yticks(range(0, n, 4))
        ax.tick_params(labelsize=8)
    boundaries(axes[0], w, n, color="0.55", lw=0.6)
    lines_at(axes[1], run_starts(perm, w, r))
    fig.suptitle(
        f"partial tail, causal: n={n}, h={h}, w={w}, r={r}\n"
        "the tail [16, 20) is one short segment; in permuted order its runs come last\n",
        fontsize=10,
    )
    handles = [Patch(color=OFFSET_COLORS[o], label=f"offset {o} (head {o})") for o in range(h)]
    fig.legend(handles=handles, loc="outside lower center", ncol=2, frameon=False, fontsize=9)
    return fig


def fig_zigzag():
    """Dense causal attention over p=4 ranks: who computes what, contiguous vs zigzag shards."""
    n, p = 32, 4
    colors = ["#4C72B0", "#DD8452", "#55A868", "#C44E52"]
    cmap = ListedColormap([EMPTY, *colors])
    norm = BoundaryNorm([-1.5 + i for i in range(p + 2)], cmap.N)
    fig, axes = plt.subplots(1, 2, figsize=(8.4, 4.9), layout="constrained")
    for ax, layout in zip(axes, ("contiguous", "zigzag")):
        owner = causal_owners(n, p, layout)
        draw_grid(ax, owner.numpy(), cmap, norm)
        work = [int((owner == t).sum()) for t in range(p)]
        ax.set_title(f'layout="{layout}"\npairs per rank: {work}', fontsize=10)
        boundaries(ax, n // (2 * p), n, color="0.55", lw=0.6)
        ax.set_xlabel("key position", fontsize=9)
        ax.set_ylabel("query position", fontsize=9)
        ax.set_xticks(range(0, n, 4))
        ax.set_yticks(range(0, n, 4))
        ax.tick_params(labelsize=8)
    fig.suptitle(
        f"dense causal attention, n={n} on p={p} ranks: each pair coloured by the rank that "
        "computes it\ncontiguous: the last rank sets the pace; zigzag (chunks i and 2p-1-i): "
        "equal work\n",
        fontsize=10,
    )
    handles = [Patch(color=colors[t], label=f"rank {t}") for t in range(p)]
    fig.legend(handles=handles, loc="outside lower center", ncol=p, frameon=False, fontsize=9)
    return fig


FIGURES = {
    "selection_lse.png": lambda: fig_selection("lse"),
    "selection_head_groups.png": lambda: fig_selection("head_groups"),
    "multiplicity_lse.png": lambda: fig_multiplicity("lse"),
    "multiplicity_head_groups.png": lambda: fig_multiplicity("head_groups"),
    "global_permutation.png": fig_global_permutation,
    "tail.png": fig_tail,
    "zigzag.png": fig_zigzag,
}


# --------------------------------------------------------------------------------------------
# ASCII pictures (pasted into docs/semantics.md; `--ascii` prints them to check they still match)
# --------------------------------------------------------------------------------------------


def ascii_selection(n, h, segment_lengths, dilation_rates, mixing):
    sel = reference.selection(n, h, segment_lengths, dilation_rates, mixing)
    table = offsets_table(h, segment_lengths, dilation_rates, mixing)
    lines = [f'mixing="{mixing}"   position: ' + "".join(str(p % 10) for p in range(n))]
    for i, (w, r) in enumerate(zip(segment_lengths, dilation_rates)):
        for head in range(h):
            off = table[i][head]
            if off is None:
                cells, note = "-" * n, "(unused)"
            else:
                cells, note = "".join("x" if s else "." for s in sel[i, head].tolist()), ""
            # a bar after every segment boundary makes segments and the tail visible
            cells = "|".join(cells[s : s + w] for s in range(0, n, w))
            label = f"w={w} r={r} head {head} off={'-' if off is None else off}"
            lines.append(f"{label:<28}{cells} {note}".rstrip())
    return "\n".join(lines)


def ascii_multiplicity(n, h, segment_lengths, dilation_rates, causal, mixing):
    m = reference.multiplicity(n, h, segment_lengths, dilation_rates, causal, mixing)
    header = "       key p' " + "".join(str(p % 10) for p in range(n))
    blocks = []
    for head in range(h):
        rows = [f"head {head}" + (" (causal)" if causal else ""), header]
        for p in range(n):
            cells = "".join("." if x == 0 else str(int(x)) for x in m[head, p].tolist())
            rows.append(f"  query {p:>2}   {cells}")
        blocks.append(rows)
    # heads side by side
    width = max(len(line) for rows in blocks for line in rows) + 4
    return "\n".join(
        "".join(rows[j].ljust(width) for rows in blocks).rstrip() for j in range(len(blocks[0]))
    )


def print_ascii():
    s = SMALL
    args = (s["n"], s["h"], s["segment_lengths"], s["dilation_rates"])
    for mixing in ("lse", "head_groups"):
        print(ascii_selection(*args, mixing), end="\n\n")
    for causal in (False, True):
        print(ascii_multiplicity(*args, causal, "lse"), end="\n\n")


# --------------------------------------------------------------------------------------------
# strategy catalog
# --------------------------------------------------------------------------------------------

KIND_BASES = {
    "dilation": "ringattn/dilation/base.py",
    "computer": "ringattn/computers/base.py",
    "communicator": "ringattn/communicators/base.py",
    "memory": "ringattn/memory/base.py",
}


def _first_paragraph(doc: str | None, name: str = "") -> str:
    """First paragraph of a docstring as one Markdown line (RST ``x`` -> `x`)."""
    text = " ".join(inspect.cleandoc(doc or "").split("\n\n")[0].split())
    text = text.replace("``", "`")
    prefix = f"`{name}`: "
    return text[len(prefix) :] if name and text.startswith(prefix) else text


def catalog() -> str:
    lines = [
        "# Strategy catalog",
        "",
        "<!-- Generated by `python docs/figures.py` from `ringattn.registry` and the module",
        "     docstrings; edit those, not this file. -->",
        "",
        "Every registered component, by registry kind; each description is the first paragraph of",
        "the docstring of the module that registers it. A `Strategy` names one component of each",
        "kind (see [architecture.md](architecture.md)); every valid one computes the same function",
        "([semantics.md](semantics.md)).",
        "",
    ]
    for kind in registry.KINDS:
        base = KIND_BASES[kind]
        # the base module's first sentence: what this kind of component decides
        base_doc = _first_paragraph(sys.modules[_module_name(base)].__doc__).split(". ")[0]
        base_doc = base_doc if base_doc.endswith(".") else base_doc + "."
        lines += [f"## `{kind}`", "", f"[{base}](../{base}): {base_doc}", ""]
        lines += ["| name | class | file | description |", "|---|---|---|---|"]
        for name in registry.names(kind):
            cls = registry.get(kind, name)
            module = sys.modules[cls.__module__]
            path = Path(inspect.getfile(module)).resolve().relative_to(REPO).as_posix()
            desc = _first_paragraph(module.__doc__, name).replace("|", "\\|")
            lines.append(f"| `{name}` | `{cls.__name__}` | [{path}](../{path}) | {desc} |")
        lines.append("")
    strategies = ringattn.Strategy.all()
    default = ringattn.Strategy()
    lines += [
        "## Combinations",
        "",
        f"`Strategy.all()` enumerates the {len(strategies)} valid combinations "
        f"(`dilation/computer/communicator/memory`); the default is `{default.label}`.",
        "",
        *[f"- `{s.label}`" for s in strategies],
        "",
    ]
    # combinations a component refuses whatever the inputs (Component.incompatible_with)
    invalid = []
    for combo in itertools.product(*(registry.names(kind) for kind in registry.KINDS)):
        strategy = ringattn.Strategy(**dict(zip(registry.KINDS, combo)))
        reason = strategy.incompatibility()
        if reason:
            invalid.append(f"- `{strategy.label}`: {reason}")
    if invalid:
        lines += ["Refused by `Strategy.check()`:", "", *invalid, ""]
    lines += [
        "Some valid strategies still refuse particular inputs (dtype, device, gradients, compile);",
        "`AttentionComputer.unsupported` says why, eagerly, before any work is done.",
        "",
    ]
    return "\n".join(lines)


def _module_name(path: str) -> str:
    return path.removesuffix(".py").replace("/", ".")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ascii", action="store_true", help="print the ASCII pictures too")
    args = parser.parse_args(argv)
    IMG.mkdir(parents=True, exist_ok=True)
    for name, make in FIGURES.items():
        fig = make()
        fig.savefig(IMG / name, **SAVE)
        plt.close(fig)
        print(f"wrote {(IMG / name).relative_to(REPO)}")
    (DOCS / "catalog.md").write_text(catalog())
    print(f"wrote {(DOCS / 'catalog.md').relative_to(REPO)}")
    if args.ascii:
        print()
        print_ascii()


if __name__ == "__main__":
    main()
