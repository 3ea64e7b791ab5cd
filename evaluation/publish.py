"""Publish a registered adapter to the Hugging Face Hub with a model card.

    python -m evaluation.publish models:/toy-sks-lora@champion --repo-id you/toy-sks-lora          # the folder
    python -m evaluation.publish models:/toy-sks-lora@champion --repo-id you/toy-sks-lora --push   # + upload
    lorafleet publish models:/toy-sks-lora@champion --repo-id you/toy-sks-lora

The folder holds the diffusers LoRA weights (``pipe.load_lora_weights(repo_id)`` loads them into the base model's
pipeline class: ``StableDiffusionXLPipeline`` for SDXL, from ``model_index.json``), lorafleet's
adapter JSON, the QA grid (base vs adapter, same seeds) as ``samples.png`` and a ``README.md`` model card
(``huggingface_hub.ModelCard``: base model, trigger, training config, evaluation metrics, the grid).
By default only the folder is written (nothing leaves the machine); ``--push`` then uploads it with one
``HfApi.upload_folder`` call (token from ``HF_TOKEN``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from evaluation.registry import TAG_STATUS, FetchedAdapter, RegistryError, client_for, fetch_adapter, stored_metrics
from training.adapter_meta import META_NAME, AdapterError, base_model_id

log = logging.getLogger(__name__)
GRID_ARTIFACT = "report/grids/trigger_base_vs_adapter.png"
SUITE_ARTIFACT = "report/suite.json"
SAMPLES = "samples.png"

CARD_TEMPLATE = """---
{{ card_data }}
---

# {{ model_name }}

A LoRA adapter for {{ base_model_text }}, trained and gated by lorafleet, teaching
one concept behind the trigger word **`{{ trigger }}`**.

{% if has_samples %}![samples](./{{ samples }})

*Upper rows: the base model; lower rows: with this adapter — same prompts, same seeds.*
{% endif %}
## Use it

```python
from diffusers import {{ pipeline_class }}

pipe = {{ pipeline_class }}.from_pretrained("{{ base_model }}"){{ base_comment }}
pipe.load_lora_weights("{{ repo_id }}")
image = pipe("{{ example_prompt }}").images[0]
```

## Training

| setting | value |
| --- | --- |
{% for k, v in training %}| {{ k }} | {{ v }} |
{% endfor %}
## Evaluation

{{ status_text }}

| metric | value |
| --- | --- |
{% for k, v in metrics %}| {{ k }} | {{ v }} |
{% endfor %}
Weights sha256: `{{ sha256 }}` (registered as {{ registry_ref }}).
"""


# the Hub tag of each family's LoRAs, as diffusers' LoRA training scripts tag their model cards
FAMILY_TAGS = {"sd": "stable-diffusion", "sdxl": "stable-diffusion-xl"}


def base_pipeline_class(base_model: str) -> tuple[str, str | None]:
    """The diffusers pipeline class that loads ``base_model`` and its family's name, from the model's
    ``model_index.json`` (``training.families.family_of``: a local folder, or a hub id in the Hugging Face cache).
    A base model whose ``model_index.json`` cannot be read here gets ``DiffusionPipeline`` (which reads it where the
    card is used and picks the class itself) and no family."""
    from evaluation.onnx_export import resolve_base
    from training.families import FamilyError, family_of

    try:
        family = family_of(resolve_base(base_model))
    except (FileNotFoundError, FamilyError) as exc:
        log.warning("the card's snippet uses DiffusionPipeline: the family of %s is not known here (%s)", base_model,
                    exc)  # fmt: skip
        return "DiffusionPipeline", None
    return family.pipeline_class.__name__, family.name


def _hub_id(base_model: str) -> str | None:
    """The base model's hub id, when it has one (a local toy model does not)."""
    ident = base_model_id(base_model)
    return ident if "/" in ident and not Path(base_model).exists() else None


def build_card(
    fetched: FetchedAdapter, repo_id: str, metrics: dict[str, float], has_samples: bool, prompt: str | None = None
):
    """The ``huggingface_hub.ModelCard`` for the adapter (metadata header + Markdown body).

    ``prompt``: an example prompt with the trigger (the QA suite's first), else ``a photo of <trigger>``.
    """
    from huggingface_hub import ModelCard, ModelCardData

    meta = fetched.meta
    hub_base = _hub_id(meta.base_model)
    pipeline_class, family = base_pipeline_class(meta.base_model)
    trigger = meta.trigger or ""
    prompt = prompt or (f"a photo of {trigger}" if trigger else "a photo")
    data = ModelCardData(
        base_model=hub_base,
        library_name="diffusers",
        license="apache-2.0",
        pipeline_tag="text-to-image",
        tags=[
            "text-to-image",
            "diffusers",
            "lora",
            *([FAMILY_TAGS[family]] if family in FAMILY_TAGS else []),
            "lorafleet",
        ],
        instance_prompt=trigger or None,
        widget=[{"text": prompt, "output": {"url": SAMPLES}}] if has_samples else None,
    )
    training = {
        "rank": meta.rank,
        "alpha": meta.alpha,
        "target modules": ", ".join(meta.target_modules),
        "text encoder LoRA": meta.text_encoder,
        "dataset sha256": (meta.dataset_hash or "")[:16],
        **{k: v for k, v in meta.training.items()},
    }
    status = (fetched.tags or {}).get(TAG_STATUS)
    status_text = (
        f"Measured by lorafleet's QA suite; promotion gate: **{status}**."
        if status
        else "Measured by lorafleet's QA suite."
    )
    return ModelCard.from_template(
        data,
        template_str=CARD_TEMPLATE,
        model_name=repo_id.rsplit("/", 1)[-1],
        repo_id=repo_id,
        pipeline_class=pipeline_class,
        base_model=hub_base or base_model_id(meta.base_model),
        base_comment="" if hub_base else "  # a local model: the path to your copy",
        base_model_text=f"`{hub_base}`" if hub_base else f"the base model `{base_model_id(meta.base_model)}`",
        trigger=trigger,
        example_prompt=prompt,
        training=[(k, v) for k, v in training.items()],
        metrics=[(k, f"{v:.4g}") for k, v in sorted(metrics.items())],
        status_text=status_text,
        sha256=meta.sha256,
        registry_ref=f"`models:/{fetched.name}/{fetched.version}`" if fetched.version else f"`{fetched.ref}`",
        has_samples=has_samples,
        samples=SAMPLES,
    )


def prepare_folder(ref: str, out_dir: str | Path, repo_id: str, tracking_uri: str | None = None) -> Path:
    """Fetch and verify the adapter, then write weights, JSON, samples and the model card to ``out_dir``.

    Raises:
        AdapterError / RegistryError: the adapter fails verification or cannot be found.
    """
    out = Path(out_dir).expanduser()
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} is not empty; choose a new --out folder (nothing is overwritten)")
    staging = out.parent / f".{out.name}.download"
    fetched = fetch_adapter(ref, staging, tracking_uri)
    out.mkdir(parents=True, exist_ok=True)
    for name in (fetched.meta.weights, META_NAME):
        shutil.copy2(fetched.path / name, out / name)
    metrics: dict[str, float] = {}
    prompt = None
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if fetched.version is not None and uri:
        client = client_for(uri)
        version = client.get_model_version(fetched.name, fetched.version)
        metrics = stored_metrics(version)
        eval_run = version.tags.get("eval_run_id") or version.run_id
        try:  # the registering evaluation's grid and suite; a version registered without them has no samples
            shutil.copy2(client.download_artifacts(eval_run, GRID_ARTIFACT, str(staging)), out / SAMPLES)
            suite = json.loads(Path(client.download_artifacts(eval_run, SUITE_ARTIFACT, str(staging))).read_text())
            prompt = suite["prompts"][0]["prompt"]
        except Exception as exc:  # noqa: BLE001
            log.warning("no QA grid/suite for %s in run %s (%s); the card has no samples", ref, eval_run, exc)
    build_card(fetched, repo_id, metrics, (out / SAMPLES).is_file(), prompt).save(out / "README.md")
    shutil.rmtree(staging, ignore_errors=True)
    return out


def upload(folder: Path, repo_id: str, *, token: str | None = None, private: bool = False) -> Any:
    """Create the model repo if needed and push the folder (one commit)."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    return api.upload_folder(
        repo_id=repo_id, folder_path=str(folder), repo_type="model", commit_message="Upload LoRA adapter (lorafleet)"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m evaluation.publish", description=__doc__.split("\n")[0])
    p.add_argument("adapter", help="models:/<name>@<alias>, models:/<name>/<version>, runs:/… or a folder")
    p.add_argument("--repo-id", required=True, help="Hub repository, e.g. you/toy-sks-lora")
    p.add_argument("--out", default=None, help="where to write the folder (default runs/publish/<repo name>)")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default $MLFLOW_TRACKING_URI)")
    p.add_argument("--push", action="store_true", help="also upload the folder to the Hub (needs HF_TOKEN)")
    p.add_argument("--private", action="store_true", help="with --push: create the Hub repository as private")
    args = p.parse_args(argv)
    if args.repo_id.count("/") != 1:
        print(f"error: --repo-id {args.repo_id!r} must be <user or org>/<name>", file=sys.stderr)
        return 2
    out = Path(args.out or f"runs/publish/{args.repo_id.split('/')[1]}")
    try:
        folder = prepare_folder(args.adapter, out, args.repo_id, args.tracking_uri)
    except (AdapterError, RegistryError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"folder: {folder} ({', '.join(sorted(f.name for f in folder.iterdir()))})")
    if not args.push:
        print(f"not uploaded (add --push to upload it to {args.repo_id})")
        return 0
    try:
        info = upload(folder, args.repo_id, token=os.environ.get("HF_TOKEN"), private=args.private)
    except Exception as exc:  # noqa: BLE001 — offline, no token, no permission: say so, keep the folder
        why = f"{type(exc).__name__}: {exc}"
        hint = f"set HF_TOKEN and check the network, or run `hf upload {args.repo_id} {folder}`"
        print(f"error: upload to {args.repo_id} failed ({why}); the folder is kept at {folder}; {hint}",
              file=sys.stderr)  # fmt: skip
        return 1
    print(f"uploaded: {getattr(info, 'commit_url', info)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
