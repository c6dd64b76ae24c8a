"""Does the bench's order (dense SDPA's long calls first) slow the dilated rows timed after it?

    python -m experiments.clock_probe [--n 131072] [--seconds 4]

The bench times dense SDPA for each row group before the dilated module. A GPU that lowers its
clock under sustained load would time the module slower right after the dense calls than when
rested, and the ratio to dense would carry that. This times the module's forward (``head_groups``
and ``lse``, causal, issue 5's shape; 20 calls back to back, median of 5) rested, right after
``--seconds`` of dense SDPA forwards, and rested again, with the SM clock NVML reports where it
can. Prints a table last; writes ``clock_probe.json`` under ``--out``.

H200 (h200_perf.md step 29): right after dense SDPA the 131K ``head_groups`` forward took 14%
longer than rested (``lse`` 2%); a bench that rested 5 s after dense SDPA's timing was no faster.
Step 30 (``bench --settle``) explains both: a rested GPU runs a short burst of the module above
its power cap, so the timelines' rested calls are the fastest; after seconds of its own calls the
module is 5-15% slower at 131K, while dense SDPA is capped from its first call.
"""

from __future__ import annotations

import argparse
import json
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

import ringattn
from experiments import ISSUE_LENGTHS, ISSUE_RATES, require_cuda
from experiments.ablate import dict_rows_to_markdown, median_ms


def sm_clock_mhz() -> int | None:
    try:
        return torch.cuda.clock_rate()
    except Exception:  # no NVML here
        return None


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=131072, help="sequence length (default: %(default)s)")
    p.add_argument(
        "--seconds",
        type=float,
        default=4.0,
        help="seconds of dense SDPA forwards before the second timing (default: %(default)s)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=Path("results") / "clock_probe",
        help="folder for clock_probe.json (default: %(default)s)",
    )
    args = p.parse_args(argv)
    require_cuda(p.prog)
    device, (h, d) = torch.device("cuda"), (16, 128)
    q, k, v = (torch.randn(1, args.n, h, d, device=device, dtype=torch.bfloat16) for _ in "qkv")
    q_t, k_t, v_t = (x.transpose(1, 2) for x in (q, k, v))
    modules = {
        mixing: ringattn.DilatedAttention(ISSUE_LENGTHS, ISSUE_RATES, causal=True, mixing=mixing)
        for mixing in ("head_groups", "lse")
    }

    def dense() -> None:
        F.scaled_dot_product_attention(q_t, k_t, v_t, is_causal=True)

    rows = []

    def time_modules(when: str) -> None:
        for mixing, module in modules.items():
            with torch.no_grad():
                ms = median_ms(partial(module, q, k, v), device, 1, 5, calls=20)
            rows.append({"when": when, "call": mixing, "ms": ms, "sm_clock_mhz": sm_clock_mhz()})

    with torch.no_grad():
        for module in modules.values():
            module(q, k, v)
        time_modules("rested")
        time.sleep(args.seconds)
        time_modules("rested after idle")
        start = time.perf_counter()
        first_dense = median_ms(dense, device, 1, 1)
        while time.perf_counter() - start < args.seconds:  # one call at a time (~0.1 s each)
            dense()
            torch.cuda.synchronize()
        last_dense = median_ms(dense, device, 0, 1)
        for when, ms in (
            ("dense, first call", first_dense),
            (f"dense after {args.seconds} s", last_dense),
        ):
            rows.append({"when": when, "call": "dense", "ms": ms, "sm_clock_mhz": sm_clock_mhz()})
        time_modules("right after dense")
        time.sleep(args.seconds)
        time_modules("rested again")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "clock_probe.json").write_text(json.dumps(rows, indent=1))
    print(dict_rows_to_markdown(rows, ["when", "call", "ms", "sm_clock_mhz"]))


if __name__ == "__main__":
    main()
