"""Long-range demo: train small LongNet LMs on two long-range tasks, dilated vs baselines.

    python -m experiments.train_longrange                  # CPU preset, both tasks, minutes
    python -m experiments.train_longrange --task majority  # one task
    python -m experiments.train_longrange --preset gpu     # longer contexts on a GPU

Tasks (only the answers are scored, so the loss measures what crosses the context):

* ``recall`` (multi-query associative recall): ``pairs`` key/value tokens are scattered over a
  long context of filler; the last ``pairs`` positions repeat the keys in random order and the
  model must output each key's value there. The signal is **one token**, anywhere.
* ``majority``: ``votes`` tokens of ``colours`` colours are scattered over the context; the last
  position must name the colour that occurs most often. The signal is **spread** over many tokens,
  and no window sees enough of them to tell.

Models (same LongNet blocks, only the attention differs): dilated configs from the registry,
a causal sliding-window baseline and dense causal attention (both through PyTorch's SDPA). The
presets use at least as many heads as the largest dilation rate, so every residue has a head
(``docs/semantics.md``, "lse with h < r").
Writes ``<task>/results.json``, ``results.md`` and ``curves.png`` under ``--out``
(docs/longrange/ holds a recorded CPU run).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

import ringattn
from experiments import make_out
from ringattn.models import LongNet, LongNetConfig
from ringattn.nn import rotary

if TYPE_CHECKING:
    from ringattn.nn.decode import KVCache


@dataclass(frozen=True)
class Preset:
    device: str
    n: int
    pairs: int
    votes: int
    colours: int
    vocab: int
    dim: int
    depth: int
    heads: int
    steps: int
    batch: int
    lr: float
    models: tuple[tuple[str, dict[str, Any]], ...]


CPU = Preset(
    device="cpu",
    n=256,
    pairs=4,
    votes=64,
    colours=4,
    vocab=32,
    dim=64,
    depth=2,
    heads=8,
    steps=600,
    batch=16,
    lr=3e-3,
    models=(
        ("dense", {"kind": "dense"}),
        ("sliding window 32", {"kind": "window", "window": 32}),
        (
            "dilated (32,128,256)/(1,4,8)",
            {"kind": "dilated", "segment_lengths": (32, 128, 256), "dilation_rates": (1, 4, 8)},
        ),
        (
            "dilated (32,256)/(1,8), 1 layer",
            {"kind": "dilated", "segment_lengths": (32, 256), "dilation_rates": (1, 8), "depth": 1},
        ),
    ),
)
GPU = replace(
    CPU,
    device="cuda",
    n=8192,
    pairs=16,
    votes=1024,
    dim=128,
    heads=16,
    steps=2000,
    batch=16,
    models=(
        ("dense", {"kind": "dense"}),
        ("sliding window 512", {"kind": "window", "window": 512}),
        (
            "dilated (512,2048,8192)/(1,4,16)",
            {"kind": "dilated", "segment_lengths": (512, 2048, 8192), "dilation_rates": (1, 4, 16)},
        ),
        (
            "dilated (512,8192)/(1,16), 1 layer",
            {
                "kind": "dilated",
                "segment_lengths": (512, 8192),
                "dilation_rates": (1, 16),
                "depth": 1,
            },
        ),
    ),
)
PRESETS = {"cpu": CPU, "gpu": GPU}


class BaselineAttention(nn.Module):
    """Causal dense or sliding-window attention with the same projections as the LongNet layer."""

    def __init__(self, config: LongNetConfig, window: int | None) -> None:
        super().__init__()
        self.heads, self.window = config.num_heads, window
        self.qkv = nn.Linear(config.dim, 3 * config.dim)
        self.norm = nn.LayerNorm(config.dim)
        self.out = nn.Linear(config.dim, config.dim)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        if cache is not None:
            # (it has none: LongNet.generate on a baseline model attended each new token to
            # itself alone, with no error)
            raise ValueError("the baseline attentions keep no KV cache: call them without one")
        q, k, v = rearrange(self.qkv(x), "b n (t h d) -> t b n h d", t=3, h=self.heads)
        positions = torch.arange(x.shape[1], device=x.device)
        q, k = rotary(q, positions), rotary(k, positions)
        q, k, v = (rearrange(t, "b n h d -> b h n d") for t in (q, k, v))
        if self.window is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            gap = positions[:, None] - positions[None, :]
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=(gap >= 0) & (gap < self.window)
            )
        result: torch.Tensor = self.out(self.norm(rearrange(out, "b h n d -> b n (h d)")))
        return result


def recall_batch(preset: Preset, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens: 0 filler, 1..K-1 keys, K..V-1 values; answers are scored at the query positions."""
    b, n, pairs = preset.batch, preset.n, preset.pairs
    keys_vocab = preset.vocab // 2
    tokens = torch.zeros(b, n, dtype=torch.long)
    targets = torch.full((b, n), -100, dtype=torch.long)
    for i in range(b):
        keys = torch.randperm(keys_vocab - 1, generator=gen)[:pairs] + 1
        values = torch.randint(keys_vocab, preset.vocab, (pairs,), generator=gen)
        slots = torch.randperm((n - pairs) // 2 - 1, generator=gen)[:pairs] * 2  # even positions
        tokens[i, slots], tokens[i, slots + 1] = keys, values
        order = torch.randperm(pairs, generator=gen)
        tokens[i, n - pairs :] = keys[order]
        targets[i, n - pairs :] = values[order]  # predict the value at the key's repeat
    return tokens, targets


def majority_counts(votes: int, colours: int) -> list[int]:
    """The leading colour occurs twice as often as each other one: clear over the whole context,
    while a window of ``w`` tokens sees only ~``w·votes/n`` votes and often misjudges."""
    lead = votes * 2 // (colours + 1)
    rest, extra = divmod(votes - lead, colours - 1)
    return [lead] + [rest + (j < extra) for j in range(colours - 1)]


def majority_batch(preset: Preset, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens: 0 filler, 1..C colours, C+1 the question at the last position (scored)."""
    b, n, colours = preset.batch, preset.n, preset.colours
    counts = torch.tensor(majority_counts(preset.votes, colours))
    tokens = torch.zeros(b, n, dtype=torch.long)
    targets = torch.full((b, n), -100, dtype=torch.long)
    for i in range(b):
        palette = torch.randperm(colours, generator=gen) + 1  # palette[0] is the majority
        slots = torch.randperm(n - 1, generator=gen)[: preset.votes]
        tokens[i, slots] = palette.repeat_interleave(counts)
        tokens[i, -1] = colours + 1
        targets[i, -1] = palette[0]
    return tokens, targets


TASKS = {"recall": recall_batch, "majority": majority_batch}


def chance(preset: Preset, task: str) -> float:
    return 1 / preset.colours if task == "majority" else 1 / (preset.vocab - preset.vocab // 2)


def build(preset: Preset, spec: dict[str, Any]) -> LongNet:
    config = LongNetConfig(
        vocab_size=preset.vocab,
        dim=preset.dim,
        depth=spec.get("depth", preset.depth),
        num_heads=preset.heads,
        segment_lengths=spec.get("segment_lengths", (preset.n,)),
        dilation_rates=spec.get("dilation_rates", (1,)),
        strategy=ringattn.Strategy(computer="sdpa"),
    )
    if spec["kind"] == "dilated":
        return LongNet(config)
    window = spec.get("window") if spec["kind"] == "window" else None
    return LongNet(config, attention=lambda c: BaselineAttention(c, window))


def train(
    preset: Preset, task: str, name: str, spec: dict[str, Any], seed: int = 0
) -> dict[str, Any]:
    torch.manual_seed(seed)
    device = torch.device(preset.device)
    model = build(preset, spec).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=preset.lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, preset.lr, total_steps=preset.steps)
    make_batch, gen = TASKS[task], torch.Generator().manual_seed(seed)
    curve, start = [], time.time()
    for _step in range(preset.steps):
        tokens, targets = (t.to(device) for t in make_batch(preset, gen))
        loss = model.loss(tokens, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        curve.append(loss.item())
    model.eval()
    with torch.no_grad():
        held_out = replace(preset, batch=256)
        tokens, targets = (
            t.to(device) for t in make_batch(held_out, torch.Generator().manual_seed(123))
        )
        predictions = torch.cat([model(chunk).argmax(-1) for chunk in tokens.split(64)])
        scored = targets != -100
        accuracy = (predictions[scored] == targets[scored]).float().mean().item()
    tail = curve[-20:]
    result = {
        "model": name,
        "final_loss": sum(tail) / len(tail),
        "accuracy": accuracy,
        "seconds": time.time() - start,
        "curve": curve,
    }
    print(
        f"{task:9s} {name:40s} loss {result['final_loss']:.3f}  accuracy {accuracy:.1%}  "
        f"({result['seconds']:.0f}s)",
        flush=True,
    )
    return result


TITLES = {
    "recall": "associative recall, n={n}, {pairs} pairs",
    "majority": "majority colour, n={n}, {votes} votes of {colours} colours",
}


def record(
    preset: Preset, command: str, task: str, results: list[dict[str, Any]], out: Path
) -> None:
    """``results.md``, ``results.json`` and ``curves.png`` under ``out``; ``command``: the
    command line that reproduces this task's run."""
    out.mkdir(parents=True, exist_ok=True)
    title = TITLES[task].format(**vars(preset))
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in results:
        smooth = torch.tensor(r["curve"]).unfold(0, min(10, len(r["curve"])), 1).mean(-1)
        ax.plot(smooth.numpy(), label=f"{r['model']} (accuracy {r['accuracy']:.0%})")
    ax.set(xlabel="step", ylabel="loss on the scored answers", yscale="log", title=title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=120)
    plt.close(fig)
    lines = [
        f"{title[0].upper() + title[1:]}; {preset.steps} steps, batch {preset.batch}, "
        f"dim {preset.dim}, {preset.heads} heads, depth {preset.depth} unless stated "
        f"(`{command}`); "
        f"chance {chance(preset, task):.1%}.",
        "",
        "| model | final loss | accuracy | seconds |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {r['model']} | {r['final_loss']:.3f} | {r['accuracy']:.1%} | {r['seconds']:.0f} |"
        for r in results
    ]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    (out / "results.json").write_text(json.dumps(results))
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default="cpu",
        help="cpu (default): minutes on 2 cores; gpu: longer contexts",
    )
    parser.add_argument(
        "--task", choices=[*TASKS, "all"], default="all", help="recall, majority or all (default)"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("results/longrange"),
        help="folder for <task>/results.json, results.md, curves.png (default: %(default)s)",
    )
    parser.add_argument(
        "--steps", type=int, default=None, help="training steps per model (default: the preset's)"
    )
    args = parser.parse_args(argv)
    if args.steps is not None and args.steps < 1:
        parser.error(f"--steps must be a positive integer, got {args.steps}")
    preset = PRESETS[args.preset]
    if args.steps is not None:
        preset = replace(preset, steps=args.steps)
    if preset.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("train_longrange: error: the gpu preset needs CUDA")
    tasks = list(TASKS) if args.task == "all" else [args.task]
    for task in tasks:  # before any training
        make_out(parser, args.out / task)
    for task in tasks:
        results = [train(preset, task, name, spec) for name, spec in preset.models]
        # (the options that change the run, so the recorded command reproduces it)
        steps = "" if args.steps is None else f" --steps {args.steps}"
        command = f"python -m experiments.train_longrange --preset {args.preset} --task {task}"
        record(preset, command + steps, task, results, args.out / task)


if __name__ == "__main__":
    main()
