"""Long-range demo: train small LongNet LMs on associative recall, dilated vs baselines.

    python -m experiments.train_longrange                 # CPU preset, a few minutes
    python -m experiments.train_longrange --preset gpu    # longer contexts on a GPU

Task (multi-query associative recall): ``pairs`` key/value tokens are scattered over the first
part of a long context of filler tokens; the last ``pairs`` positions repeat the keys in random
order, and the model must output each key's value there. Only those answers are scored, so the
loss measures recall across the whole context (up to ``n`` tokens back).

Models (same LongNet blocks, only the attention differs): dilated configs from the registry,
a causal sliding-window baseline and dense causal attention (both through PyTorch's SDPA).
Writes ``results.json``, ``results.md`` and ``curves.png`` under ``--out`` (docs/longrange/ holds a
recorded CPU run).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, replace
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

import ringattn
from ringattn.models import LongNet, LongNetConfig
from ringattn.nn import rotary


@dataclass(frozen=True)
class Preset:
    device: str
    n: int
    pairs: int
    vocab: int
    dim: int
    depth: int
    heads: int
    steps: int
    batch: int
    lr: float
    models: tuple[tuple[str, dict], ...]


CPU = Preset(
    device="cpu",
    n=256,
    pairs=4,
    vocab=32,
    dim=64,
    depth=2,
    heads=4,
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
    dim=128,
    heads=8,
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

    def forward(self, x, cache=None):
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
        return self.out(self.norm(rearrange(out, "b h n d -> b n (h d)")))


def recall_batch(preset: Preset, gen: torch.Generator, device) -> tuple[torch.Tensor, torch.Tensor]:
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
    return tokens.to(device), targets.to(device)


def build(preset: Preset, spec: dict) -> LongNet:
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


def train(preset: Preset, name: str, spec: dict, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    device = torch.device(preset.device)
    model = build(preset, spec).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=preset.lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, preset.lr, total_steps=preset.steps)
    gen = torch.Generator().manual_seed(seed)
    curve, start = [], time.time()
    for _step in range(preset.steps):
        tokens, targets = recall_batch(preset, gen, device)
        loss = model.loss(tokens, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        curve.append(loss.item())
    model.eval()
    with torch.no_grad():
        tokens, targets = recall_batch(
            replace(preset, batch=256), torch.Generator().manual_seed(123), device
        )
        predictions = model(tokens).argmax(-1)
        scored = targets != -100
        accuracy = (predictions[scored] == targets[scored]).float().mean().item()
    result = {
        "model": name,
        "final_loss": sum(curve[-20:]) / 20,
        "recall_accuracy": accuracy,
        "seconds": time.time() - start,
        "curve": curve,
    }
    print(
        f"{name:40s} loss {result['final_loss']:.3f}  recall {accuracy:.1%}  "
        f"({result['seconds']:.0f}s)",
        flush=True,
    )
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--out", type=Path, default=Path("results/longrange"))
    parser.add_argument("--steps", type=int, default=None)
    args = parser.parse_args(argv)
    preset = PRESETS[args.preset]
    if args.steps is not None:
        preset = replace(preset, steps=args.steps)
    if preset.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("train_longrange: error: the gpu preset needs CUDA")
    results = [train(preset, name, spec) for name, spec in preset.models]
    args.out.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in results:
        smooth = torch.tensor(r["curve"]).unfold(0, 10, 1).mean(-1)
        ax.plot(smooth.numpy(), label=f"{r['model']} (recall {r['recall_accuracy']:.0%})")
    ax.set(
        xlabel="step",
        ylabel="loss on the recalled values",
        yscale="log",
        title=f"associative recall, n={preset.n}, {preset.pairs} pairs",
    )
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out / "curves.png", dpi=120)
    chance = 1 / (preset.vocab - preset.vocab // 2)
    lines = [
        f"Associative recall, n={preset.n}, {preset.pairs} pairs, {preset.steps} steps, "
        f"batch {preset.batch}, dim {preset.dim}, {preset.heads} heads "
        f"(`python -m experiments.train_longrange --preset {args.preset}`); chance "
        f"{chance:.1%}.",
        "",
        "| model | final loss | recall accuracy | seconds |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {r['model']} | {r['final_loss']:.3f} | {r['recall_accuracy']:.1%} | "
        f"{r['seconds']:.0f} |"
        for r in results
    ]
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    (args.out / "results.json").write_text(json.dumps(results))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
