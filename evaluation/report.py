"""The QA report: metrics (adapter vs base vs champion), the gate's checks and base-vs-adapter grids.

Writes ``report.md`` (grids by relative path), ``report.html`` (self-contained: images inlined, so it
renders in MLflow's artifact viewer), ``grids/*.png`` and ``metrics.json`` into one folder.
"""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path
from typing import Any

from PIL import Image

from evaluation.config import METRICS, RELATIVE, EvalConfig
from evaluation.gate import GateResult
from evaluation.qa import Rendered
from training.sampling import image_grid

FAILED_TILE = (128, 128, 128)


def _tiles(r: Rendered, idx: list[int], size: tuple[int, int]) -> list[Image.Image]:
    return [r.images[i] if r.images[i] is not None else Image.new("RGB", size, FAILED_TILE) for i in idx]


def compare_grid(base: Rendered, adapter: Rendered, cols: int = 6, per_prompt: int = 1) -> Image.Image | None:
    """Rows of ``cols`` images, alternating base model / adapter, for the first ``per_prompt`` seeds of each
    prompt (same seeds above and below); failed generations are grey tiles."""
    n = len(adapter.images)
    if not n:
        return None
    size = next((im.size for im in [*adapter.images, *base.images] if im is not None), (64, 64))
    seeds = sorted(set(adapter.seeds))[:per_prompt]
    idx = [i for i in range(n) if adapter.seeds[i] in seeds]
    cols = min(cols, len(idx))
    rows = []
    for start in range(0, len(idx), cols):
        chunk = idx[start : start + cols]
        pad = [Image.new("RGB", size, "white")] * (cols - len(chunk))
        rows += _tiles(base, chunk, size) + pad + _tiles(adapter, chunk, size) + pad
    return image_grid(rows, cols)


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def metric_rows(metrics: dict, base: dict, champion: dict | None) -> list[list[str]]:
    """One row per measured metric: name, adapter, base model (relative metrics: "vs base"), [champion], better."""
    rows = []
    for name, direction in METRICS.items():
        if name not in metrics and name not in base:
            continue
        better = "higher" if direction == "max" else "lower"
        row = [name, _fmt(metrics.get(name)), "vs base" if name in RELATIVE else _fmt(base.get(name))]
        if champion is not None:
            row.append(_fmt(champion["metrics"].get(name)))
        rows.append([*row, better])
    return rows


def _md_table(header: list[str] | None, rows: list[list[str]]) -> str:
    header = header or [""] * len(rows[0])  # Markdown tables need a header row
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def _html_table(header: list[str] | None, rows: list[list[str]]) -> str:
    head = "<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>" if header else ""
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table>{head}{body}</table>"


# a report is a list of blocks, rendered twice: ("h2", text) | ("p", text) | ("table", header, rows) | ("img", path)
Block = tuple


def _markdown(title: str, blocks: list[Block], root: Path) -> str:
    out = [f"# {title}", ""]
    for kind, *rest in blocks:
        if kind == "h2":
            out.append(f"## {rest[0]}")
        elif kind == "p":
            out.append(rest[0])
        elif kind == "table":
            out.append(_md_table(*rest))
        else:
            path = rest[0]
            out.append(f"![{path.stem}]({path.relative_to(root).as_posix()})")
        out.append("")
    return "\n".join(out)


STYLE = (
    "body{font-family:sans-serif;margin:2em;max-width:70em} table{border-collapse:collapse;margin:1em 0}"
    "td,th{border:1px solid #ccc;padding:4px 8px;text-align:left} img{image-rendering:pixelated;width:100%;"
    "max-width:60em} .pass{color:#176f2c} .fail{color:#b00020}"
)


def _html(title: str, blocks: list[Block], passed: bool) -> str:
    """Self-contained: images inlined as data URIs, so MLflow's artifact viewer renders it whole."""
    body = [f"<h1 class='{'pass' if passed else 'fail'}'>{html.escape(title)}</h1>"]
    for kind, *rest in blocks:
        if kind in ("h2", "p"):
            body.append(f"<{kind}>{html.escape(rest[0])}</{kind}>")
        elif kind == "table":
            body.append(_html_table(*rest))
        else:
            data = base64.b64encode(rest[0].read_bytes()).decode()
            body.append(f"<img src='data:image/png;base64,{data}'>")
    head = f"<meta charset='utf-8'><title>{html.escape(title)}</title><style>{STYLE}</style>"
    return f"<!doctype html><html><head>{head}</head><body>{''.join(body)}</body></html>\n"


def write_report(
    out_dir: Path,
    *,
    cfg: EvalConfig,
    adapter: dict[str, Any],
    metrics: dict[str, float],
    base_metrics: dict[str, float],
    gate: GateResult,
    base_images,
    adapter_images,
    registry: dict[str, Any] | None = None,
) -> list[Path]:
    """Write the report files; return their paths (grids included) for logging as artifacts."""
    out_dir.mkdir(parents=True, exist_ok=True)
    grids_dir = out_dir / "grids"
    grids_dir.mkdir(exist_ok=True)
    grids: dict[str, Path] = {}
    for key, base_r, ad_r in (
        ("trigger", base_images.trigger, adapter_images.trigger),
        ("prior", base_images.prior, adapter_images.prior),
    ):
        grid = compare_grid(base_r, ad_r)
        if grid is not None:
            grids[key] = grids_dir / f"{key}_base_vs_adapter.png"
            grid.save(grids[key])

    header = ["metric", "adapter", "base model"]
    champion = gate.champion
    if champion is not None:
        header.append(f"champion v{champion['version']}")
    header.append("better")
    check_rows = [
        [c.name, _fmt(c.value), f"{c.op} {c.threshold:.4g}", _fmt(c.margin), "pass" if c.passed else "FAIL"]
        for c in gate.checks
    ]
    title = f"QA report: adapter {adapter['sha256'][:12]} — gate {'PASSED' if gate.passed else 'FAILED'}"
    g, suite = cfg.generation, cfg.suite
    seeds = f"seeds {g.seed}…{g.seed + suite.images_per_prompt - 1}"
    prompts = f"{len(suite.prompts)} trigger prompts, {len(suite.prior_prompts)} prior prompts"
    facts = [
        ["adapter", adapter["ref"]],
        ["sha256", adapter["sha256"]],
        ["base model", adapter["base_model"]],
        ["trigger", f"{suite.trigger} = {suite.concept}" if suite.concept else f"{suite.trigger} (no concept word)"],
        ["suite", "hand-written (config)" if suite.concept else "built from the dataset's captions"],
        ["scorer", cfg.clip_model],
        ["generation", f"{g.steps} steps, guidance {g.guidance}, {seeds}, {prompts}"],
    ]
    if registry:
        facts.append(["registry", ", ".join(f"{k}={v}" for k, v in registry.items() if v is not None)])
    blocks: list[Block] = [("table", None, facts), ("h2", "Gate"), ("p", gate.summary())]
    if check_rows:
        blocks.append(("table", ["check", "value", "threshold", "margin", "result"], check_rows))
    relative = (
        "Relative metrics compare the adapter with the base model on the same prompts and seeds: concept_gain and "
        "concept_win_rate against the training images (image-image CLIP similarity), heldout_loss_ratio, "
        "flexibility_delta, prior_similarity (1 = prompts without the trigger untouched)."
    )
    blocks += [("h2", "Metrics"), ("table", header, metric_rows(metrics, base_metrics, champion)), ("p", relative)]
    captions = {
        "trigger": "Trigger prompts: base model (upper row of each pair) vs adapter (lower row), same seeds.",
        "prior": "Prompts without the trigger: base model vs adapter — the adapter should leave them alone.",
    }
    for key, path in grids.items():
        blocks += [("h2", f"{key.capitalize()} prompts"), ("p", captions[key]), ("img", path)]
    trig = adapter_images.trigger
    failed = [[p, str(s), e] for p, s, e in zip(trig.prompts, trig.seeds, trig.errors) if e]
    if failed:
        blocks += [("h2", "Failed generations"), ("table", ["prompt", "seed", "error"], failed)]
    (out_dir / "report.md").write_text(_markdown(title, blocks, out_dir))
    (out_dir / "report.html").write_text(_html(title, blocks, gate.passed))

    summary = {
        "adapter": adapter,
        "metrics": metrics,
        "base_metrics": base_metrics,
        "gate": gate.to_dict(),
        "registry": registry,
        "comparable_key": cfg.comparable_key(),
    }
    (out_dir / "metrics.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return [out_dir / "report.md", out_dir / "report.html", out_dir / "metrics.json", *grids.values()]
