"""Measure the toy world's quality bar and write the figures (JSON) and a sample grid (PNG).

    python -m evaluation.toy_quality                                   # shipped models, full bar (~2 min)
    python -m evaluation.toy_quality --prompts-per-caption 1 --clip-images 60   # quicker
    python -m evaluation.toy_quality --grid docs/toy_sd_samples.png    # also refresh the README grid
    python -m evaluation.toy_quality --model models/toy-sdxl --out runs/toy_quality_sdxl.json   # the SDXL toy base

Bar (issue 2): on >= 60 seeded prompts the base model draws the prompted colour in >= 90%
and the prompted shape in >= 75% of images (pixel classifier, cross-checked by toy CLIP);
toy CLIP retrieves the right base-world caption for >= 90% of fresh real images and tells
the pattern backgrounds apart for >= 90%. The base model may be of either family (SD, SDXL): it is loaded by
``training.families.load_pipeline`` and sampled by ``training.sampling.generate``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from PIL import Image
from transformers import CLIPModel, CLIPProcessor

from evaluation.metrics import retrieval_accuracy
from evaluation.toy_metrics import clip_similarity, read_image
from training.families import load_pipeline
from training.sampling import generate, write_samples
from training.toy_world import world

BAR = {"colour_accuracy": 0.90, "shape_accuracy": 0.75, "clip_base_retrieval": 0.90, "clip_pattern_accuracy": 0.90}
EVAL_SEED = 10_000  # far from the seeds the build trains on


def generator_fidelity(
    model: str, prompts_per_caption: int, steps: int, guidance: float
) -> tuple[dict, list[Image.Image], list[str]]:
    """Generate every base caption ``prompts_per_caption`` times (seeded) and classify the images.

    Returns:
        (figures and failures, the images, their prompts)
    """
    captions = world.base_captions()
    prompts = [c for c in captions for _ in range(prompts_per_caption)]
    pipe = load_pipeline(model)
    images = generate(pipe, prompts, seed=EVAL_SEED, steps=steps, guidance=guidance)
    truths = [c.split() for c in prompts]  # "a(n) {colour} {shape} on a {bg} background"
    readings = [read_image(img) for img in images]
    colour_ok = [r.colour == t[1] for r, t in zip(readings, truths)]
    shape_ok = [r.shape == t[2] for r, t in zip(readings, truths)]
    figures = {
        "prompts": len(prompts),
        "colour_accuracy": sum(colour_ok) / len(prompts),
        "shape_accuracy": sum(shape_ok) / len(prompts),
        "failures": [
            {"prompt": p, "read_colour": r.colour, "read_shape": r.shape, "fill": round(r.fill, 3)}
            for p, r, c, s in zip(prompts, readings, colour_ok, shape_ok)
            if not (c and s)
        ],
    }
    return figures, images, prompts


def clip_shape_agreement(clip: CLIPModel, processor: CLIPProcessor, images: list, prompts: list[str]) -> float:
    """Second opinion on shapes: toy CLIP's zero-shot pick among ``a {shape}`` prompts."""
    texts = [world.caption_for(None, s, None) for s in world.SHAPES]
    sim = clip_similarity(clip, processor, images, texts)
    return retrieval_accuracy(sim, [world.SHAPES.index(p.split()[2]) for p in prompts])


def clip_quality(clip: CLIPModel, processor: CLIPProcessor, n: int) -> dict:
    """Caption retrieval on fresh real images; pattern separation on patterned ones."""
    captions = world.base_captions()
    base = world.scenes(EVAL_SEED + 1, n)
    sim = clip_similarity(clip, processor, [world.render(s) for s in base], captions)
    base_acc = retrieval_accuracy(sim, [captions.index(s.caption) for s in base])

    patterned = world.scenes(EVAL_SEED + 2, n, backgrounds=world.PATTERNS)
    # for each image: which background word, given its true colour and shape?
    correct = 0
    for sc in patterned:
        options = [world.caption_for(sc.colour, sc.shape, b) for b in world.BACKGROUNDS]
        sim = clip_similarity(clip, processor, [world.render(sc)], options)
        correct += int(sim.argmax()) == world.BACKGROUNDS.index(sc.background)
    return {"images": n, "clip_base_retrieval": base_acc, "clip_pattern_accuracy": correct / n}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--model", "--sd", dest="sd", default="models/toy-sd", help="base model folder of any family (toy-sd, toy-sdxl)"
    )
    p.add_argument("--clip", default="models/toy-clip")
    p.add_argument("--prompts-per-caption", type=int, default=2, help="36 base captions x this = prompts")
    p.add_argument("--clip-images", type=int, default=360)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--out", default="runs/toy_quality.json")
    p.add_argument("--grid", default=None, help="also write the first 36 samples as a grid PNG here")
    args = p.parse_args(argv)

    torch.manual_seed(0)
    fidelity, images, prompts = generator_fidelity(args.sd, args.prompts_per_caption, args.steps, args.guidance)
    clip = CLIPModel.from_pretrained(args.clip).eval()
    processor = CLIPProcessor.from_pretrained(args.clip)
    fidelity["clip_shape_agreement"] = clip_shape_agreement(clip, processor, images, prompts)
    report = {
        "model": args.sd,
        "generator": fidelity,
        "clip": clip_quality(clip, processor, args.clip_images),
        "bar": BAR,
    }
    flat = {**fidelity, **report["clip"]}
    report["passed"] = {k: flat[k] >= v for k, v in BAR.items()}

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    if args.grid:
        picked = list(range(0, len(images), args.prompts_per_caption))[:36]
        grid = write_samples(
            [images[i] for i in picked],
            [prompts[i] for i in picked],
            Path(args.out).parent / "toy_quality_samples",
            cols=9,
        )
        Path(args.grid).parent.mkdir(parents=True, exist_ok=True)
        Path(args.grid).write_bytes(grid.read_bytes())
    for key, bar in BAR.items():
        print(f"{key:24s} {flat[key]:.3f}  (bar {bar:.2f})  {'PASS' if flat[key] >= bar else 'FAIL'}")
    print(f"clip_shape_agreement     {fidelity['clip_shape_agreement']:.3f}  ({fidelity['prompts']} prompts)")
    print(f"report: {args.out}")
    return 0 if all(report["passed"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
