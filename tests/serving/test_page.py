"""The web page's model list, run in Node with a small DOM stand-in (no browser): the ids of GET /v1/models appear,
grouped by registered model, and '(default)' stays the first choice. The headless-Chromium round trip is in
test_serve_run.py."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

PAGE = Path(__file__).resolve().parents[2] / "serving" / "static" / "index.html"
DOM = """
class El {
  constructor(tag) { this.tagName = tag; this.children = []; this.value = ""; this.textContent = ""; this.label = ""; }
  appendChild(c) { c.parent = this; this.children.push(c); return c; }
  remove() { const s = this.parent.children; s.splice(s.indexOf(this), 1); }
  addEventListener() {}
  all() { return this.children.flatMap((c) => [c, ...c.all()]); }
  querySelectorAll(tag) { return this.all().filter((e) => e.tagName === tag); }
}
class Select extends El {
  get options() { return this.all().filter((e) => e.tagName === "option"); }
  set length(n) { this.options.slice(n).forEach((o) => o.remove()); }
  get value() { return this._value ?? (this.options[0] || {}).value; }
  set value(v) { this._value = v; }
}
const els = { model: new Select("select"), key: new El("input"), status: new El("p"), form: new El("form") };
const first = new El("option"); first.textContent = "(default)"; els.model.appendChild(first);
globalThis.document = { getElementById: (id) => els[id] || new El("div"), createElement: (t) => new El(t) };
globalThis.fetch = async () => ({ ok: true, json: async () => ({ data: CARDS }) });
"""


def test_the_page_lists_every_model_grouped_by_registered_model():
    node = shutil.which("node")
    if node is None:
        pytest.skip("needs node")
    cards = [
        {"id": "base", "kind": "base"},
        {"id": "champion", "kind": "adapter", "registered_model": "toy-sks-lora", "version": "2",
         "aliases": ["champion"], "status": "passed"},
        {"id": "toy-ohwx-lora", "kind": "registry", "registered_model": "toy-ohwx-lora", "version": "1",
         "aliases": ["champion"], "status": "passed"},
        {"id": "toy-ohwx-lora/1", "kind": "registry", "registered_model": "toy-ohwx-lora", "version": "1",
         "aliases": ["champion"], "status": "passed"},
        {"id": "toy-sks-lora@previous", "kind": "registry", "registered_model": "toy-sks-lora", "version": "1",
         "aliases": ["previous"], "status": "passed"},
    ]  # fmt: skip
    script = re.search(r"<script>(.*)</script>", PAGE.read_text(), re.S).group(1)
    program = (
        f"const CARDS = {json.dumps(cards)};\n{DOM}\n{script}\n"
        + """
(async () => {
  await loadModels();
  const sel = document.getElementById("model");
  const groups = sel.children.filter((c) => c.tagName === "optgroup")
    .map((g) => [g.label, g.children.map((o) => [o.value, o.textContent])]);
  console.log(JSON.stringify({ first: sel.options[0].textContent, value: sel.value, groups }));
})();
"""
    )
    out = subprocess.run([node, "-e", program], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    page = json.loads(out.stdout.strip().splitlines()[-1])
    assert page["first"] == "(default)" and page["value"] == ""  # a request without a model: the server's default
    assert page["groups"] == [
        ["served by name", [["base", "base"], ["champion", "champion (toy-sks-lora, v2, champion, passed)"]]],
        ["registered model toy-ohwx-lora", [["toy-ohwx-lora", "toy-ohwx-lora (v1, champion, passed)"],
                                            ["toy-ohwx-lora/1", "toy-ohwx-lora/1 (v1, champion, passed)"]]],
        ["registered model toy-sks-lora", [["toy-sks-lora@previous", "toy-sks-lora@previous (v1, previous, passed)"]]],
    ]  # fmt: skip
