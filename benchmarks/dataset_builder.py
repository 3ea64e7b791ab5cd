"""Measure the dataset builder's defaults on the toy world: caption accuracy, blur and near-duplicate calibration.

    python benchmarks/dataset_builder.py                 # ~1 min on 2 CPU cores -> runs/benchmarks/dataset_builder.json
    python benchmarks/dataset_builder.py --scenes 100    # quicker

(1) The toy captioner (toy CLIP ranking the world's 90 captions) on the toy-sks dataset (`lorafleet dataset toy`'s
defaults: the captions are known) and on wider-world scenes over all five backgrounds: colour / shape / background
accuracy and whole-caption accuracy. (2) Variance of the Laplacian of sharp scenes and of Gaussian-blurred copies
(radius 0.5-3 px): percentiles, and the share flagged at ``CurateConfig.blur_threshold``. (3) Toy-CLIP cosine of
each scene with its JPEG re-encode, mirror and 1-pixel edit, and between distinct scenes with the same or a different
caption: the share above ``CurateConfig.duplicate_threshold``.
"""

from __future__ import annotations

import argparse
import io
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from training.captioning import CaptionConfig
from training.captioning.toy import ToyCaptioner
from training.curation import CurateConfig, laplacian_variance
from training.toy_world import world
from training.toy_world.dataset import write_finetune_dataset

REPO = Path(__file__).resolve().parents[1]


def _jpeg(im: Image.Image, quality: int = 85) -> Image.Image:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def _edit(im: Image.Image) -> Image.Image:
    out = im.copy()
    out.putpixel((0, 0), (0, 0, 0))
    return out


def _accuracy(pred: list[tuple[str, str, str]], truth: list[tuple[str, str, str]]) -> dict[str, float]:
    names = ("colour", "shape", "background")
    acc = {n: float(np.mean([p[i] == t[i] for p, t in zip(pred, truth)])) for i, n in enumerate(names)}
    acc["caption"] = float(np.mean([p == t for p, t in zip(pred, truth)]))
    return acc


def captions(captioner: ToyCaptioner, n: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        root = write_finetune_dataset(Path(tmp) / "toy-sks")  # = data/toy-sks (same defaults and seed)
        rows = [json.loads(line) for line in (root / "metadata.jsonl").read_text().splitlines()]
        images = [Image.open(root / r["file_name"]).convert("RGB") for r in rows]
    t0 = time.perf_counter()
    written = captioner.caption(images)
    seconds = time.perf_counter() - t0
    sks = {"images": len(rows), "exact_caption": float(np.mean([w == r["text"] for w, r in zip(written, rows)])),
           "ms_per_image": 1000 * seconds / len(rows)}  # fmt: skip
    scenes = world.scenes(11, n, backgrounds=world.BACKGROUNDS)
    pred = captioner.predict([world.render(s) for s in scenes])
    wider = _accuracy(pred, [(s.colour, s.shape, s.background) for s in scenes])
    return {"toy_sks": sks, "wider_world": {"images": n, **wider}}


def blur(images: list[Image.Image], threshold: float) -> dict:
    out = {}
    for radius in (0, 0.5, 1, 1.5, 2, 3):
        v = [laplacian_variance(im.filter(ImageFilter.GaussianBlur(radius)) if radius else im) for im in images]
        out[f"radius_{radius}"] = {"min": min(v), "p5": float(np.percentile(v, 5)), "median": float(np.median(v)),
                                   "max": max(v), "flagged": float(np.mean(np.array(v) < threshold))}  # fmt: skip
    return out


def duplicates(captioner: ToyCaptioner, scenes: list, threshold: float) -> dict:
    images = [world.render(s) for s in scenes]
    emb = captioner.scorer.images(images)
    out = {}
    for name, f in (("jpeg_q85", _jpeg), ("mirror", lambda im: im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)),
                    ("one_pixel_edit", _edit)):  # fmt: skip
        cos = (emb * captioner.scorer.images([f(im) for im in images])).sum(dim=1).numpy()
        out[name] = {
            "min": float(cos.min()),
            "median": float(np.median(cos)),
            "flagged": float((cos > threshold).mean()),
        }
    sim = (emb @ emb.T).numpy()
    caps = [s.caption for s in scenes]
    i, j = np.triu_indices(len(scenes), k=1)
    same = np.array([caps[a] == caps[b] for a, b in zip(i, j)])
    for name, mask in (("distinct_same_caption", same), ("distinct_other_caption", ~same)):
        cos = sim[i, j][mask]
        out[name] = {"pairs": int(mask.sum()), "median": float(np.median(cos)), "p99": float(np.percentile(cos, 99)),
                     "max": float(cos.max()), "flagged": float((cos > threshold).mean())}  # fmt: skip
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scenes", type=int, default=300, help="wider-world scenes per measurement")
    p.add_argument("--out", default="runs/benchmarks/dataset_builder.json")
    a = p.parse_args()
    cfg = CurateConfig()
    captioner = ToyCaptioner(CaptionConfig(captioner="toy", model=str(REPO / "models" / "toy-clip"), trigger="sks"))
    scenes = world.scenes(1, a.scenes, backgrounds=world.BACKGROUNDS)
    result = {
        "captioner": captions(captioner, a.scenes),
        "blur_threshold": cfg.blur_threshold,
        "blur": blur([world.render(s) for s in scenes], cfg.blur_threshold),
        "duplicate_threshold": cfg.duplicate_threshold,
        "duplicates": duplicates(captioner, scenes, cfg.duplicate_threshold),
    }
    c = result["captioner"]
    print(f"toy captioner: toy-sks {c['toy_sks']['exact_caption']:.0%} exact captions of {c['toy_sks']['images']} "
          f"({c['toy_sks']['ms_per_image']:.1f} ms/image); wider world ({a.scenes} scenes): "
          + ", ".join(f"{k} {v:.1%}" for k, v in c["wider_world"].items() if k != "images"))  # fmt: skip
    print(f"blur (variance of the Laplacian at 64 px; flagged below {cfg.blur_threshold:g}):")
    for k, v in result["blur"].items():
        print(f"  {k:11s} min {v['min']:8.1f}  p5 {v['p5']:8.1f}  median {v['median']:8.1f}  max {v['max']:8.1f}  "
              f"flagged {v['flagged']:.1%}")  # fmt: skip
    print(f"near-duplicates (toy-CLIP cosine; flagged above {cfg.duplicate_threshold:g}):")
    for k, v in result["duplicates"].items():
        stats = "  ".join(f"{s} {x:.4f}" for s, x in v.items() if s not in ("flagged", "pairs"))
        print(f"  {k:23s} {stats}  flagged {v['flagged']:.1%}")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
