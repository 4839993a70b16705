"""The per-token view in a real browser (Debian's headless Chromium driven by Playwright, every network request
blocked): it renders without an error, its hover shows exactly the stored predictions, its selectors work, and
hostile text from prompts, responses and the vocabulary stays text."""

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import internal_policy as ip
from cli_helpers import run_cli
from conftest import ROWS
from tiny_models import save_tiny_model

HOSTILE = "</script><img src=x onerror=alert(1)>"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
STATE = {"layer": "resid", "attn": "attn_out", "ffn": "ffn_out"}


@pytest.fixture(scope="module")
def browser():
    playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    if CHROMIUM is None:
        pytest.skip("no Chromium on this machine: apt-get install -y chromium (.ci/run does it)")
    with playwright.sync_playwright() as p:
        launched = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield launched
        launched.close()


class Page:
    """A page opened from a file with every request but that file aborted; console errors, page errors, dialogs
    and requests recorded."""

    def __init__(self, browser, path: Path):
        self.context = browser.new_context(viewport={"width": 1200, "height": 900})
        self.errors, self.requests, self.dialogs = [], [], []
        own = path.resolve().as_uri()
        self.context.route("**/*", lambda route: route.continue_() if route.request.url == own else route.abort())
        self.page = self.context.new_page()
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("request", lambda r: self.requests.append(r.url))
        self.page.on("dialog", lambda d: (self.dialogs.append(d.message), d.dismiss()))
        self.page.goto(own)

    def hover(self, t: int, layer: int):
        self.page.mouse.move(0, 0)
        self.page.hover(f'.cell[data-t="{t}"][data-layer="{layer}"]')
        return self.page.locator("#tip")

    def colours(self) -> list[str]:
        return self.page.eval_on_selector_all(".cell", "cells => cells.map(c => c.style.background)")

    def labels(self) -> list[str]:
        return self.page.eval_on_selector_all(".label", "labels => labels.map(l => l.textContent)")


def hover_mismatches(page: Page, result, sample_index: int, t: int, layer: int, policy: str, step=None) -> list[str]:
    """Hover cell (t, layer) under ``policy`` and compare the tooltip with the stored predictions table, value for
    value: the top-k ids in order, their probabilities (float32, exactly), the sampled token's probability and rank.
    Returns what differs (empty: the hover shows exactly the table)."""
    table = result.prediction_table
    positions = sorted(result.tokens[result.tokens["sample_index"] == sample_index]["position"].unique())
    mask = pc.and_(pc.and_(pc.equal(table["sample_index"], sample_index), pc.equal(table["position"], int(positions[t]))),
                   pc.and_(pc.equal(table["layer"], layer), pc.equal(table["state"], STATE[policy])))
    if step is not None:
        mask = pc.and_(mask, pc.equal(table["step"], step))
    row = table.filter(mask).to_pylist()
    assert len(row) == 1
    row = row[0]
    page.page.select_option("#policy", policy)
    tip = page.hover(t, layer)
    items = tip.locator("li")
    shown_ids = [int(items.nth(i).get_attribute("data-id")) for i in range(items.count())]
    shown_probs = [np.float32(float(items.nth(i).get_attribute("data-prob"))) for i in range(items.count())]
    sampled = tip.locator(".tip-sampled")
    problems = []
    if shown_ids != row["top_ids"]:
        problems.append(f"ids {shown_ids} != {row['top_ids']}")
    if shown_probs != [np.float32(p) for p in row["top_probs"]]:
        problems.append(f"probs {shown_probs} != {row['top_probs']}")
    if np.float32(float(sampled.get_attribute("data-prob"))) != np.float32(row["token_prob"]):
        problems.append(f"token prob {sampled.get_attribute('data-prob')} != {row['token_prob']}")
    if int(sampled.get_attribute("data-rank")) != row["token_rank"]:
        problems.append(f"rank {sampled.get_attribute('data-rank')} != {row['token_rank']}")
    texts = dict(zip(result.vocabulary["token_id"], result.vocabulary["text"]))
    for i, token_id in enumerate(shown_ids):
        shown = texts[token_id].replace("\n", "\u21b5").replace("\t", "\u21e5")
        if json.dumps(shown, ensure_ascii=False) not in items.nth(i).inner_text():
            problems.append(f"text of {token_id}")
    return problems


@pytest.fixture(scope="module")
def hostile_model(tmp_path_factory):
    """A tiny model whose vocabulary holds a hostile token, and whose responses and prompts carry it too."""
    folder = save_tiny_model(tmp_path_factory.mktemp("hostile"), "llama")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.add_tokens([HOSTILE])
    model = AutoModelForCausalLM.from_pretrained(folder)
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    with torch.no_grad():
        model.lm_head.weight[-1].normal_(0, 0.5)
        model.get_input_embeddings().weight[-1].normal_(0, 0.5)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def hostile_result(hostile_model, tmp_path_factory):
    rows = [{"prompt": f"Say {HOSTILE} twice", "response": f"{HOSTILE} hello {HOSTILE} world"}, *ROWS[:3]]
    out = tmp_path_factory.mktemp("view") / "result"
    result = ip.analyse(model=str(hostile_model), samples=[ip.Sample(id=f"s{i}", **r) for i, r in enumerate(rows)],
                        top_k=4, out=out)
    assert run_cli("view", out).exit_code == 0
    return result, out / "view.html"


def test_the_view_renders_offline_and_its_hover_shows_exactly_the_stored_predictions(browser, hostile_result, tmp_path):
    result, path = hostile_result
    page = Page(browser, path)
    assert page.errors == [] and page.requests == [path.resolve().as_uri()]
    n_layers = result.manifest["n_layers"]
    assert page.page.locator(".cell").count() == n_layers * len(page.labels())
    for policy, t, layer in (("layer", 0, 1), ("layer", 3, n_layers), ("attn", 2, 2), ("ffn", 5, 3)):
        assert hover_mismatches(page, result, 0, t, layer, policy) == [], (policy, t, layer)
    # the policy and colour selectors recolour the cells
    page.page.select_option("#policy", "layer")
    before = page.colours()
    page.page.select_option("#policy", "ffn")
    assert page.colours() != before
    page.page.select_option("#colour", "delta")
    assert page.page.locator("#legend-low").inner_text().startswith("-")
    # the sample selector shows another sample's tokens, with its own predictions
    page.page.select_option("#sample", "2")
    texts = dict(zip(result.vocabulary["token_id"], result.vocabulary["text"]))
    tokens = result.tokens[(result.tokens["sample_index"] == 2) & (result.tokens["layer"] == 1)
                           & (result.tokens["module"] == "layer")].sort_values("position")
    assert page.labels() == [texts[i].replace("\n", "\u21b5") for i in tokens["token_id"]]
    assert hover_mismatches(page, result, 2, 1, 2, "attn") == []
    page.page.screenshot(path=tmp_path / "view.png")
    assert (tmp_path / "view.png").read_bytes()[:4] == b"\x89PNG"
    assert page.errors == [] and page.dialogs == []


def test_the_hover_check_fails_on_a_corrupted_probability(browser, hostile_result, tmp_path):
    """The planted defect: one stored probability changed after the page was written. The same check that passes on
    the real table must see it."""
    import pyarrow as pa

    result, path = hostile_result
    table = result.prediction_table
    positions = sorted(result.tokens[result.tokens["sample_index"] == 0]["position"].unique())
    target = pc.and_(pc.and_(pc.equal(table["sample_index"], 0), pc.equal(table["position"], int(positions[1]))),
                     pc.and_(pc.equal(table["layer"], 2), pc.equal(table["state"], "ffn_out")))
    index = int(np.flatnonzero(target.to_numpy(zero_copy_only=False))[0])
    probs = table["top_probs"].to_pylist()
    probs[index] = [p * 0.5 for p in probs[index]]
    corrupted = table.set_column(table.schema.get_field_index("top_probs"), "top_probs",
                                 pa.array(probs, type=table.schema.field("top_probs").type))
    page = Page(browser, path)
    assert hover_mismatches(page, result, 0, 1, 2, "ffn") == []
    broken = type(result)(**{**result.__dict__, "prediction_table": corrupted})
    assert any(m.startswith("probs") for m in hover_mismatches(page, broken, 0, 1, 2, "ffn"))


def test_hostile_text_stays_text(browser, hostile_result):
    result, path = hostile_result
    page = Page(browser, path)
    assert page.dialogs == [] and page.errors == []
    assert page.page.locator("img").count() == 0  # nothing from the data became an element
    labels = page.labels()
    assert labels.count(HOSTILE) == 2  # the hostile vocabulary token, shown as a row label, twice
    page.page.locator("summary").click()
    assert page.page.locator("#prompt").inner_text() == f"Say {HOSTILE} twice"
    tip = page.hover(labels.index(HOSTILE), 1)
    assert HOSTILE in tip.inner_text()
    # token text is isolated: a right-to-left override inside a token cannot reorder the numbers around it
    styles = page.page.eval_on_selector_all("#tip .text, .label", "els => els.map(e => getComputedStyle(e).unicodeBidi)")
    assert styles and set(styles) == {"isolate"}
    assert page.dialogs == [] and page.page.locator("img").count() == 0


def test_the_checkpoint_selector_shows_each_checkpoints_predictions(browser, tiny_llama, rows_file, tmp_path):
    changed = tmp_path / "changed"
    shutil.copytree(tiny_llama, changed)
    model = AutoModelForCausalLM.from_pretrained(changed)
    with torch.no_grad():
        model.lm_head.weight.mul_(0.5)
    model.save_pretrained(changed)
    out = tmp_path / "compare"
    result = ip.compare([str(tiny_llama), str(changed)], data=str(rows_file), top_k=3, out=out)
    path = result.view(tmp_path / "view.html")
    page = Page(browser, path)
    assert page.page.locator("#step option").count() == 2 and page.errors == []
    shown = []
    for index, label in enumerate([tiny_llama.name, "changed"]):
        page.page.select_option("#step", str(index))
        tip = page.hover(1, 4)  # the real policy: halving U changes it
        assert label in tip.inner_text()
        shown.append(float(tip.locator(".tip-h").get_attribute("data-h")))
        stored = result.tokens.query("sample_index == 0 and layer == 4 and module == 'layer' and checkpoint == @label")
        assert np.float32(shown[-1]) == np.float32(stored.sort_values("position")["entropy_out"].iloc[1])
    assert shown[0] != shown[1]  # each checkpoint's own entropies


def test_view_out_takes_a_folder_and_names_a_missing_one(hostile_result, tmp_path):
    result, _ = hostile_result
    folder = tmp_path / "pages"
    folder.mkdir()
    written = run_cli("view", result.out, "--out", folder)
    assert written.exit_code == 0 and (folder / "view.html").read_text().startswith("<!DOCTYPE html>")
    missing = run_cli("view", result.out, "--out", tmp_path / "no" / "page.html")
    assert missing.exit_code != 0 and "does not exist" in missing.output and not (tmp_path / "no").exists()
    onto = run_cli("view", result.out, "--out", result.out / "tokens.parquet")
    assert onto.exit_code == 2 and ".html" in onto.output and ip.EntropyResult.load(result.out).tokens is not None


def test_a_view_into_a_folder_being_written_is_refused_from_the_library_too(hostile_result):
    """The view written into its result's own folder takes that folder's one writer's lock (a notebook's call as much
    as `ipolicy view`), so it never lands between a run's writes."""
    from internal_policy.runs import folder_lock

    result, _ = hostile_result
    link = result.out.parent / "through-a-link"
    link.symlink_to(result.out, target_is_directory=True)
    with folder_lock(result.out):
        with pytest.raises(ip.IPolicyError, match="being written"):
            result.view(result.out)
        with pytest.raises(ip.IPolicyError, match="being written"):  # the same folder by another name
            ip.EntropyResult.load(link).view(link)
    assert result.view(result.out) == result.out / "view.html"
