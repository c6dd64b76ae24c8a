"""The long-range demo's tasks say what they claim, and the script runs end to end."""

from __future__ import annotations

import json
from dataclasses import replace

import torch

from experiments import train_longrange as demo


def test_majority_counts_lead_twice_the_others():
    for votes, colours in [(64, 4), (1024, 4), (30, 2), (101, 5)]:
        counts = demo.majority_counts(votes, colours)
        assert sum(counts) == votes and len(counts) == colours
        assert counts[0] > max(counts[1:]) and abs(counts[0] - 2 * counts[1]) <= colours


def test_majority_target_is_the_most_frequent_colour():
    preset = replace(demo.CPU, batch=8)
    tokens, targets = demo.majority_batch(preset, torch.Generator().manual_seed(0))
    for row, target in zip(tokens, targets):
        scored = target[target != -100]
        assert scored.numel() == 1 and row[-1] == preset.colours + 1
        counts = torch.bincount(row[:-1], minlength=preset.colours + 1)[1:]
        assert int(counts.argmax()) + 1 == int(scored)


def test_recall_target_is_the_value_after_the_key():
    preset = replace(demo.CPU, batch=4)
    tokens, targets = demo.recall_batch(preset, torch.Generator().manual_seed(0))
    for row, target in zip(tokens, targets):
        for pos in (target != -100).nonzero().flatten().tolist():
            first = (row[: preset.n - preset.pairs] == row[pos]).nonzero().flatten()
            assert first.numel() == 1 and row[first + 1] == target[pos]


def test_cpu_preset_runs_both_tasks_and_records_them(tmp_path):
    demo.main(["--steps", "2", "--out", str(tmp_path)])
    for task in demo.TASKS:
        results = json.loads((tmp_path / task / "results.json").read_text())
        assert [r["model"] for r in results] == [name for name, _ in demo.CPU.models]
        assert all(len(r["curve"]) == 2 and 0 <= r["accuracy"] <= 1 for r in results)
        assert (tmp_path / task / "curves.png").stat().st_size > 0
        # the recorded command reproduces this run: its step count too, not the preset's
        command = f"`python -m experiments.train_longrange --preset cpu --task {task} --steps 2`"
        assert command in (tmp_path / task / "results.md").read_text()
