"""The README's and the documentation's picture of the per-token view, taken in a real browser anyone can rerun:

    python docs/screenshot_view.py runs/demo [--out docs/images/view.png] [--token 6 --layer 20 --policy ffn]

It writes RESULT/view.html (as ``ipolicy view`` does), opens it in headless Chromium (Debian's ``chromium``; every
network request blocked), hovers one cell and saves the screenshot.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import internal_policy as ip

ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("result", type=Path, help="a results folder of `ipolicy entropy`")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "images" / "view.png")
    parser.add_argument("--token", type=int, default=6, help="the row (token) to hover")
    parser.add_argument("--layer", type=int, default=None, help="the column (layer) to hover (default: two thirds up)")
    parser.add_argument("--policy", default="ffn", choices=["layer", "attn", "ffn"])
    parser.add_argument("--colour", default="entropy", choices=["entropy", "delta"])
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    result = ip.EntropyResult.load(args.result)
    page_path = result.view(args.result / "view.html")
    layer = args.layer or max(1, 2 * result.manifest.get("n_layers", 3) // 3)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=ARGS)
        context = browser.new_context(viewport={"width": 1280, "height": 720}, device_scale_factor=1)
        own = page_path.resolve().as_uri()
        context.route("**/*", lambda route: route.continue_() if route.request.url == own else route.abort())
        page = context.new_page()
        page.goto(own)
        page.select_option("#policy", args.policy)
        page.select_option("#colour", args.colour)
        page.hover(f'.cell[data-t="{args.token}"][data-layer="{layer}"]')
        args.out.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=args.out)
        browser.close()
    print(args.out)


if __name__ == "__main__":
    main()
