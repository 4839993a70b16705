"""How large the per-token view is and how long it takes to open, for a real result: the embedded SmolLM2 (30 layers),
32 MATH-500 samples of up to 128 response tokens, top-k 5 (the default).

    python benchmarks/bench_view.py [--samples 32] [--tokens 128] [--repeats 3] [--folder runs/bench-view]

Analyses once into --folder (resumed when there), writes the view with the default 8 samples and with all of them,
and opens each in headless Chromium (Debian's, driven by Playwright, every request but the file blocked), --repeats
times in fresh pages: the time from navigation to the drawn grid (every cell of the first sample in the page), and
the time to switch to the last sample (decoding its arrays and drawing it). Writes benchmarks/results/view.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import internal_policy as ip

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"]


def open_times(browser, path: Path, cells: int, last: int, last_cells: int, repeats: int) -> dict:
    """Seconds to the drawn grid (``cells`` cells) and to the last sample (option ``last``, ``last_cells`` cells)
    drawn after a switch; the minimum of ``repeats`` fresh pages, and every time."""
    own = path.resolve().as_uri()
    opened, switched = [], []
    for _ in range(repeats):
        context = browser.new_context(viewport={"width": 1400, "height": 900})
        context.route("**/*", lambda route: route.continue_() if route.request.url == own else route.abort())
        page = context.new_page()
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        start = time.perf_counter()
        page.goto(own)
        page.wait_for_function(f"document.querySelectorAll('#grid .cell').length === {cells}", timeout=120_000)
        opened.append(time.perf_counter() - start)
        start = time.perf_counter()
        page.select_option("#sample", index=last)
        page.wait_for_function(f"document.querySelectorAll('#grid .cell').length === {last_cells}", timeout=120_000)
        page.evaluate("() => new Promise(r => requestAnimationFrame(() => r()))")  # painted
        switched.append(time.perf_counter() - start)
        assert not errors, errors
        context.close()
    return {"open_s": min(opened), "open_s_all": opened, "switch_sample_s": min(switched), "switch_all": switched}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--folder", type=Path, default=ROOT / "runs" / "bench-view")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "view.json")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    result = ip.analyse(data="math500", limit=args.samples, max_new_tokens=args.tokens, top_k=5, out=args.folder,
                        progress=True)
    tokens = result.tokens
    per_sample = tokens[(tokens["layer"] == 1) & (tokens["module"] == "layer")].groupby("sample_index").size()
    out = {"model": result.manifest["model"], "layers": int(tokens["layer"].max()), "samples": len(per_sample),
           "tokens": int(per_sample.sum()), "top_k": 5, "chromium": shutil.which("chromium"), "views": {}}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=ARGS)
        for shown in (None, args.samples):
            path = result.view(args.folder / f"view-{shown or 'default'}.html", samples=shown)
            n = len(per_sample) if shown else min(8, len(per_sample))
            first = int(per_sample.index[0])
            cells = int(per_sample.iloc[0]) * out["layers"]
            out["views"][f"{n} samples"] = {
                "samples": n, "tokens": int(per_sample.iloc[:n].sum()), "megabytes": path.stat().st_size / 1e6,
                "first_sample_cells": cells, "first_sample": first,
                **open_times(browser, path, cells, n - 1, int(per_sample.iloc[n - 1]) * out["layers"], args.repeats)}
            print(json.dumps(out["views"][f"{n} samples"]))
        browser.close()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
