"""The documentation site, checked like code: it builds in strict mode (and a broken link fails the build), its
command-line reference lists exactly what every command's --help shows, its Python reference every public name,
the docstring examples run, and the built site opens in a real browser with no network."""

import doctest
import html
import importlib
import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import internal_policy as ip
from ipolicy_cli.main import app

ROOT = Path(__file__).resolve().parents[1]
needs_mkdocs = pytest.mark.skipif(importlib.util.find_spec("mkdocs") is None, reason="pip install -e '.[docs]'")


def hooks():
    spec = importlib.util.spec_from_file_location("docs_hooks", ROOT / "docs" / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build(config: Path, site: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(config), "-d", str(site)],
                          capture_output=True, text=True, cwd=ROOT, env={**__import__("os").environ,
                                                                         "NO_MKDOCS_2_WARNING": "1"})


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    out = tmp_path_factory.mktemp("site")
    done = build(ROOT / "mkdocs.yml", out)
    assert done.returncode == 0, done.stdout + done.stderr
    return out


@needs_mkdocs
def test_the_site_builds_strictly_and_a_broken_link_fails_it(site, tmp_path):
    assert (site / "index.html").is_file() and (site / "reference" / "python" / "index.html").is_file()
    copy = tmp_path / "copy"
    shutil.copytree(ROOT / "docs", copy / "docs")
    config = (ROOT / "mkdocs.yml").read_text()
    (copy / "mkdocs.yml").write_text(config)
    page = copy / "docs" / "guides" / "analyse.md"
    page.write_text(page.read_text() + "\nSee [the missing page](no-such-page.md).\n")
    for folder in ("figures", "benchmarks"):  # the hook serves these from the repository
        (copy / folder).symlink_to(ROOT / folder)
    broken = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "s")],
                            capture_output=True, text=True, cwd=copy)
    assert broken.returncode != 0 and "no-such-page.md" in broken.stdout + broken.stderr


def help_flags(command: str) -> set[str]:
    """The flags `ipolicy COMMAND --help` shows in its option column (a wide terminal, so that no row wraps): the
    dash-led words that open each row of the options panel."""
    import itertools

    shown = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "250", "TERMINAL_WIDTH": "250"}).output
    flags = set()
    for line in shown.splitlines():
        if line.startswith("│ -"):
            flags |= set(itertools.takewhile(lambda word: word.startswith("-"), line[1:].split()))
    return flags


def test_the_cli_reference_lists_exactly_each_commands_options():
    reference = hooks().cli_reference()
    sections = dict(re.findall(r"## `ipolicy ([\w-]+)`\n(.*?)(?=\n## `ipolicy |\Z)", reference, re.S))
    commands = set(hooks().cli_commands())
    assert set(sections) == commands and {"entropy", "train-grpo", "train-bupo", "eval", "figures", "view"} <= commands
    for command, text in sections.items():
        listed = set(re.findall(r"`(--[a-z][a-z0-9-]*|-[a-z])`", text))
        assert listed == help_flags(command), command


@needs_mkdocs
def test_the_python_reference_shows_every_public_name(site):
    page = (site / "reference" / "python" / "index.html").read_text()
    missing = [name for name in ip.__all__ if name != "__version__"
               and f'id="internal_policy.{ip._EXPORTS[name]}.{name}"' not in page]
    assert not missing and "ip.__version__" in page, missing
    text = html.unescape(re.sub(r"<[^>]+>", "", page))
    assert "analyse(config: EntropyConfig | None = None, *, out: str | Path | None = None" in text  # signatures shown
    assert "Layer-wise and module-wise internal policy entropy" in page  # a docstring, rendered


def test_docstring_examples_run():
    attempted = 0
    for name in ("stats", "runs", "data", "config"):
        result = doctest.testmod(importlib.import_module(f"internal_policy.{name}"))
        assert result.failed == 0, name
        attempted += result.attempted
    assert attempted >= 4


@needs_mkdocs
def test_the_built_site_opens_with_no_network(site):
    """Served from this machine (as `mkdocs serve` or any static server does; the search index needs http, not
    file://), with every other host unreachable (Chromium resolves no name but 127.0.0.1) and every request recorded:
    every page renders with its figures, search works, and nothing was asked of another host. (Playwright's request
    interception is not used: it races with the search index's web worker, which then never answers.)"""
    playwright = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("no Chromium on this machine: apt-get install -y chromium (.ci/run does it)")
    pages = [site / "index.html", site / "guides" / "read-one-token" / "index.html", site / "results" / "index.html",
             site / "definitions" / "index.html"]
    import functools
    import http.server
    import threading

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(site))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    local = f"http://127.0.0.1:{server.server_address[1]}/"
    try:
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=[
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1"])
            context = browser.new_context()
            context.set_default_timeout(90_000)  # a loaded 2-core CI machine, not a slow page
            outside = []
            context.on("request", lambda request: None if request.url.startswith((local, "data:"))
                       else outside.append(request.url))
            for path in pages:
                page = context.new_page()
                errors = []
                page.on("pageerror", lambda e: errors.append(str(e)))
                page.goto(local + path.relative_to(site).parent.as_posix() + "/")
                assert page.title() and errors == [], (path, errors)
                images = page.eval_on_selector_all("img", "imgs => imgs.map(i => i.complete && i.naturalWidth > 0)")
                assert all(images), path  # every figure found offline
            page.fill("input.md-search__input", "boundary layer")
            page.wait_for_selector(".md-search-result__item", timeout=30000)
            assert page.locator(".md-search-result__item").count() > 0  # the local search index answers
            browser.close()
    finally:
        server.shutdown()
    assert outside == []  # nothing fetched from another host: no CDN fonts or scripts
