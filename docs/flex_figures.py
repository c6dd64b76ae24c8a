"""Draw the flex block masks for docs/flex.md: ``python docs/flex_figures.py``.

For a few configs: the element mask and the visited tiles of (a) the single-kernel form on the
unpermuted sequence and (b) each config's kernel on the permuted layout, for head 0, plus a table
of the fraction of tiles each visits.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch.nn.attention.flex_attention import create_mask  # noqa: E402

from ringattn import masks  # noqa: E402
from ringattn.computers.flex import FlexComputer  # noqa: E402
from ringattn.memory.none import NoReuse  # noqa: E402
from ringattn.pattern import make_plan  # noqa: E402

OUT = Path(__file__).parent / "img"
N, H, BLOCK = 256, 2, 16
CASES = [
    ("one config, r=1", ((64, 1),)),
    ("one config, r=4", ((128, 4),)),
    ("LongNet-style mixture", ((32, 1), (64, 2), (128, 4))),
]


def tiles_and_elements(block_mask, head: int):
    element = create_mask(block_mask.mask_mod, 1, H, N, N, device="cpu")[0, head]
    tiles = block_mask.to_dense()[0].expand(H, -1, -1)[head].bool()
    return element, tiles


def draw(ax, element, tiles, title):
    shown = torch.ones(N, N, 3)  # skipped tile: white
    visited = tiles.repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)[:N, :N]
    shown[visited] = torch.tensor([0.85, 0.9, 1.0])  # visited tile: light blue
    shown[element] = torch.tensor([0.1, 0.2, 0.6])  # allowed (q, k): dark blue
    ax.imshow(shown.numpy(), interpolation="nearest")
    ax.set_title(title, fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])


def main() -> None:
    OUT.mkdir(exist_ok=True)
    computer = FlexComputer()
    computer.block_size = BLOCK
    rows = ["| case | causal | layout | fraction of tiles visited |", "|---|---|---|---|"]
    for slug, (name, configs) in zip(("r1", "r4", "mixture"), CASES):
        for causal in (False, True):
            plan = make_plan(N, H, configs, "lse")
            single = computer.prepare(plan, causal, "segment_local", torch.device("cpu"), NoReuse())
            per_config = computer.prepare(plan, causal, "global", torch.device("cpu"), NoReuse())
            fig, axes = plt.subplots(1, 1 + len(configs), figsize=(2.6 * (1 + len(configs)), 2.9))
            draw(axes[0], *tiles_and_elements(single[0], 0),
                 f"unpermuted, one kernel\n{masks.computed_fraction(single[0]):.1%} of tiles")
            rows.append(f"| {name} {configs} | {causal} | unpermuted single kernel | "
                        f"{masks.computed_fraction(single[0]):.3f} |")
            for ax, (w, r), (_, _, bm) in zip(axes[1:], configs, per_config):
                draw(ax, *tiles_and_elements(bm, 0),
                     f"permuted, w={w} r={r}\n{masks.computed_fraction(bm):.1%} of tiles")
                rows.append(f"| {name} {configs} | {causal} | permuted, config w={w} r={r} | "
                            f"{masks.computed_fraction(bm):.3f} |")
            fig.suptitle(f"{name}, n={N}, head 0, block {BLOCK}, causal={causal}", fontsize=9)
            fig.tight_layout()
            fig.savefig(OUT / f"flex_{slug}{'_causal' if causal else ''}.png", dpi=110)
            plt.close(fig)
    (OUT / "flex_fractions.md").write_text("\n".join(rows) + "\n")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
