"""The toy world: rebuild its models, write a fine-tuning dataset, or sample the base model.

    python -m training.toy_world build --config configs/toy_world.yaml            # ~25 min on 2 CPU cores
    python -m training.toy_world build --config configs/toy_world.yaml clip.steps=20 vae.steps=20 \\
        unet.steps=20 clip.pool_size=200 unet.pool_size=200 out_dir=/tmp/toy     # tiny CPU run (~1 min)
    python -m training.toy_world build-sdxl --config configs/toy_world_sdxl.yaml  # models/toy-sdxl (~20 min)
    python -m training.toy_world build-sdxl unet.steps=20 unet.pool_size=200 out_dir=/tmp/toy   # tiny CPU run
    python -m training.toy_world dataset data/toy-sks --trigger sks --concept dotted
    python -m training.toy_world sample --model models/toy-sd --out runs/samples --n 12
    python -m training.toy_world sample --adapter runs/train/adapter --compare \\
        --prompt "a red circle on a sks background"
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from training.configuration import ConfigError, load_config
from training.toy_world.config import ToySdxlConfig, ToyWorldConfig


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.toy_world", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    b = sub.add_parser("build", help="train models/toy-clip and models/toy-sd from scratch")
    p.set_defaults(build_parser=b)  # main re-parses build's arguments with options among the overrides
    b.add_argument("--config", default="configs/toy_world.yaml", help="YAML with ToyWorldConfig values")
    b.add_argument("overrides", nargs="*", help="dotted overrides, e.g. unet.steps=100")

    x = sub.add_parser("build-sdxl", help="train models/toy-sdxl's SDXL UNet on the shipped toy SD / CLIP parts")
    p.set_defaults(build_sdxl_parser=x)
    x.add_argument("--config", default="configs/toy_world_sdxl.yaml", help="YAML with ToySdxlConfig values")
    x.add_argument("overrides", nargs="*", help="dotted overrides, e.g. unet.steps=100")

    d = sub.add_parser("dataset", help="write a fine-tuning dataset (images + metadata.jsonl)")
    d.add_argument("out_dir", help="new or empty folder to write into")
    d.add_argument("--trigger", default="sks", help="rare word that will stand for the concept")
    d.add_argument(
        "--concept",
        default="dotted",
        help="background to teach: striped, dotted, checkered, or framed (a style the toy CLIP scorer has no word for)",
    )
    d.add_argument("--num-images", type=int, default=20)
    d.add_argument("--num-validation", type=int, default=6, help="held-out validation prompts")
    d.add_argument("--seed", type=int, default=0)

    s = sub.add_parser("sample", help="generate seeded images from a model folder and a grid")
    s.add_argument("--model", default="models/toy-sd", help="diffusers folder or hub id")
    s.add_argument("--out", default="runs/samples", help="folder for PNGs, prompts.json and grid.png")
    s.add_argument("--n", type=int, default=12, help="number of prompts (cycles the base world)")
    s.add_argument("--prompt", action="append", help="explicit prompt (repeatable); overrides --n")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--steps", type=int, default=25)
    s.add_argument("--guidance", type=float, default=4.0)
    s.add_argument("--adapter", help="LoRA adapter folder (safetensors + lorafleet_adapter.json) to apply")
    s.add_argument("--compare", action="store_true", help="with --adapter: grid row 1 = base, row 2 = adapter")
    return p


def main(argv: list[str] | None = None) -> int:
    from training.quiet import quiet_libraries

    quiet_libraries()
    parser = _parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args, rest = parser.parse_known_args(argv)
    if args.command in ("build", "build-sdxl"):  # `build a=1 --config x b=2`: options among the dotted overrides
        sub = args.build_parser if args.command == "build" else args.build_sdxl_parser
        args = sub.parse_intermixed_args(argv[argv.index(args.command) + 1 :], namespace=args)
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command == "build":
        try:
            cfg = load_config(ToyWorldConfig, args.config, args.overrides)
        except ConfigError as exc:
            print(exc, file=sys.stderr)
            return 2
        from training.toy_world.build import build

        summary = build(cfg)
        print(json.dumps({k: v for k, v in summary.items() if k != "config"}, indent=2))
        print(f"wrote {cfg.out_dir}/toy-sd and {cfg.out_dir}/toy-clip")
    elif args.command == "build-sdxl":
        try:
            cfg = load_config(ToySdxlConfig, args.config, args.overrides)
        except ConfigError as exc:
            print(exc, file=sys.stderr)
            return 2
        from training.toy_world.sdxl import SDXL_DIR, build_sdxl

        try:
            summary = build_sdxl(cfg)
        except FileNotFoundError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(json.dumps({k: v for k, v in summary.items() if k != "config"}, indent=2))
        print(f"wrote {cfg.out_dir}/{SDXL_DIR}")
    elif args.command == "dataset":
        from training.toy_world.dataset import write_finetune_dataset

        try:
            out = write_finetune_dataset(
                args.out_dir,
                trigger=args.trigger,
                concept=args.concept,
                num_images=args.num_images,
                num_validation=args.num_validation,
                seed=args.seed,
            )
        except ValueError as exc:
            print(exc, file=sys.stderr)
            return 2
        print(f"wrote {args.num_images} images + metadata.jsonl + validation_prompts.txt to {out}")
    else:
        from training.toy_world.sample import demo_prompts, generate, load_pipeline, write_samples

        prompts = args.prompt or demo_prompts(args.n)
        t0 = time.perf_counter()
        pipe = load_pipeline(args.model)
        kwargs = dict(seed=args.seed, steps=args.steps, guidance=args.guidance)
        images = generate(pipe, prompts, **kwargs) if args.compare or not args.adapter else []
        if args.adapter:
            from training.adapter import AdapterError, load_adapter

            try:
                load_adapter(pipe, args.adapter)
            except AdapterError as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 2
            images += generate(pipe, prompts, **kwargs)  # same seeds: row 2 differs only by the adapter
        cols = len(prompts) if args.compare and args.adapter else 6
        grid = write_samples(images, prompts * (len(images) // len(prompts)), args.out, cols=cols)
        print(f"{len(images)} images in {time.perf_counter() - t0:.1f}s -> {grid}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
