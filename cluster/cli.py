"""The ``lorafleet`` command line.

    lorafleet up                                # Ray head (dashboard :8265) + MLflow (:5000) on 127.0.0.1
    lorafleet submit pipeline --follow          # the end-to-end job through `ray job submit`
    lorafleet generate "a red circle on a sks background" --model champion --n 2
    lorafleet status | logs JOB_ID --follow | stop JOB_ID | jobs [JOB_ID] | serve | validate DIR | down
    lorafleet dataset toy data/toy-sks --trigger sks --concept dotted
    lorafleet caption data/my-photos --trigger sks --dry-run     # captions for images without one (toy CLIP / BLIP)
    lorafleet curate data/toy-sks --select 8                     # near-duplicates, blurred images, a diverse subset
    lorafleet toy-world build --config configs/toy_world.yaml
    lorafleet toy-world sample --n 12 --out runs/samples
    lorafleet train --config configs/train.yaml train.epochs=5
    lorafleet tune --config configs/tune.yaml search.num_samples=8
    lorafleet evaluate --adapter runs/train/adapter --config configs/eval.yaml
    lorafleet registry show toy-sks-lora
    lorafleet promote toy-sks-lora 3            # champion -> version 3 (the old one becomes previous)
    lorafleet rollback toy-sks-lora             # champion back to the previous one
    lorafleet promote toy-sks-lora 4 --challenger   # version 4 gets canary.share of the champion's traffic
    lorafleet canary status toy-sks-lora | promote toy-sks-lora [--force]   # compare the arms; promote a better one
    lorafleet publish models:/toy-sks-lora@champion --repo-id you/toy-sks-lora --push
    lorafleet import-adapter my_lora.safetensors --name my-style --trigger ohwx   # a LoRA trained elsewhere
    lorafleet export-adapter my-style@champion --format kohya my_style.safetensors
    lorafleet export-onnx my-style@champion onnx/my-style     # fused into the base model: ONNX for onnxruntime
    lorafleet quality --grid docs/toy_sd_samples.png
    lorafleet keys add acme | list | revoke acme [--key ID]   # tenants' API keys for the Serve app (hashed at rest)
    lorafleet generations --model toy-sks-lora --since 1h     # what serving did: requests, errors, p50/p95, prompts

Each sub-command hands its arguments to the module that owns the job, so
``lorafleet X ...`` and ``python -m <module> ...`` behave the same — except that while ``lorafleet up``'s cluster
runs, the commands that use MLflow find its server without ``--tracking-uri`` / ``$MLFLOW_TRACKING_URI``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Iterator

from cluster.commands import COMMANDS as CLUSTER_COMMANDS
from training.quiet import quiet_libraries


def _toy_world(args: list[str]) -> int:
    from training.toy_world.__main__ import main

    return main(args)


def _dataset(args: list[str]) -> int:
    usage = "usage: lorafleet dataset toy OUT_DIR [--trigger sks] [--concept dotted]  (`dataset toy --help`)"
    if args[:1] in (["-h"], ["--help"]):
        print(f"{usage}\nWrite a fine-tuning dataset; `toy` is the toy world's (the only kind so far).")
        return 0
    if not args or args[0] != "toy":
        print(usage, file=sys.stderr)
        return 2
    from training.toy_world.__main__ import main

    return main(["dataset", *args[1:]])


def _caption(args: list[str]) -> int:
    from training.captioning.__main__ import main

    return main(args)


def _curate(args: list[str]) -> int:
    from training.curation import main

    return main(args)


def _train(args: list[str]) -> int:
    from training.train import main

    return main(args)


def _tune(args: list[str]) -> int:
    from tuning.tune import main

    return main(args)


def _evaluate(args: list[str]) -> int:
    from evaluation.evaluate import main

    return main(args)


def _registry(args: list[str]) -> int:
    from evaluation.registry import main

    return main(args)


def _registry_verb(verb: str):
    """``lorafleet promote|rollback …`` = ``python -m evaluation.registry promote|rollback …``."""

    def run(args: list[str]) -> int:
        from evaluation.registry import main

        # global options (--tracking-uri) go before the verb for argparse; accept them anywhere
        lead: list[str] = []
        rest = list(args)
        if "--tracking-uri" in rest:
            i = rest.index("--tracking-uri")
            lead, rest = rest[i : i + 2], rest[:i] + rest[i + 2 :]
        elif given := [a for a in rest if a.startswith("--tracking-uri=")]:
            lead, rest = given[:1], [a for a in rest if a != given[0]]
        return main([*lead, verb, *rest])

    return run


def _promote(args: list[str]) -> int:
    """``promote NAME VERSION`` moves the alias (evaluation.registry); ``promote NAME --trial ID --epoch N`` or
    ``--adapter REF`` evaluates and registers a checkpoint picked by eye first (evaluation.promote)."""
    if args[:1] in (["-h"], ["--help"]) or args == ["help"]:
        print("lorafleet promote NAME VERSION [--force]       move the champion alias to a registered version\n"
              "lorafleet promote NAME VERSION --challenger   set the canary's challenger alias instead\n"
              "lorafleet promote NAME --trial ID --epoch N   evaluate + register a checkpoint picked from the sample "
              "grids\n")  # fmt: skip
        from evaluation.promote import main

        return main(["--help"])
    if any(a.split("=")[0] in ("--trial", "--epoch", "--adapter", "--config") for a in args):
        from evaluation.promote import main

        return main(args)
    return _registry_verb("promote")(args)


def _canary(args: list[str]) -> int:
    from serving.canary_cli import main

    return main(args)


def _publish(args: list[str]) -> int:
    from evaluation.publish import main

    return main(args)


def _import_adapter(args: list[str]) -> int:
    from evaluation.adapter_io import main_import

    return main_import(args)


def _export_adapter(args: list[str]) -> int:
    from evaluation.adapter_io import main_export

    return main_export(args)


def _export_onnx(args: list[str]) -> int:
    from evaluation.onnx_export import main

    return main(args)


def _keys(args: list[str]) -> int:
    from serving.keys import main

    return main(args)


def _generations(args: list[str]) -> int:
    from cluster.generations import main

    return main(args)


def _quality(args: list[str]) -> int:
    from evaluation.toy_quality import main

    return main(args)


COMMANDS = {
    **CLUSTER_COMMANDS,
    "toy-world": (_toy_world, "build the toy models, or sample from a model (python -m training.toy_world)"),
    "dataset": (_dataset, "write a fine-tuning dataset: `dataset toy OUT_DIR`"),
    "caption": (
        _caption,
        "caption the images that have none: `caption DIR --trigger sks` (python -m training.captioning)",
    ),
    "curate": (
        _curate,
        "near-duplicates, blurred images, a diverse subset: `curate DIR` (python -m training.curation)",
    ),
    "train": (_train, "fine-tune a LoRA adapter with Ray Train (python -m training.train)"),
    "tune": (_tune, "search LoRA hyperparameters with Ray Tune + Optuna (python -m tuning.tune)"),
    "evaluate": (_evaluate, "score an adapter, run the gate, register it (python -m evaluation.evaluate)"),
    "registry": (_registry, "show / promote / rollback registered adapters (python -m evaluation.registry)"),
    "promote": (
        _promote,
        "make a version the champion: `promote NAME VERSION`, or a checkpoint you picked from "
        "the sample grids: `promote NAME --trial ID --epoch N`",
    ),
    "rollback": (_registry_verb("rollback"), "move the champion alias back to the previous one: `rollback NAME`"),
    "canary": (
        _canary,
        "the challenger against the champion on live traffic: `canary status NAME` | `canary promote NAME [--force]`",
    ),
    "publish": (_publish, "push an adapter + model card to the Hugging Face Hub (python -m evaluation.publish)"),
    "import-adapter": (
        _import_adapter,
        "bring your own LoRA (diffusers, kohya/A1111, PEFT): `import-adapter FILE --name NAME [--trigger W]`",
    ),
    "export-adapter": (_export_adapter, "write an adapter for A1111/ComfyUI: `export-adapter REF --format kohya OUT`"),
    "export-onnx": (
        _export_onnx,
        "fuse an adapter into its base model and export it to ONNX: `export-onnx REF OUT_DIR`",
    ),
    "quality": (_quality, "measure the toy world's quality bar (python -m evaluation.toy_quality)"),
    "generations": (
        _generations,
        "what a served model did (requests, errors, p50/p95, top prompts): `generations --model NAME --since 1h`",
    ),
    "keys": (_keys, "tenants' API keys: `keys add TENANT` (printed once, stored hashed) | list | revoke TENANT"),
}


# the sub-commands that read $MLFLOW_TRACKING_URI when neither --tracking-uri nor their config names a server
MLFLOW_COMMANDS = (
    "train", "tune", "evaluate", "registry", "promote", "rollback", "canary", "publish", "import-adapter",
    "export-adapter", "export-onnx", "generations",
)  # fmt: skip


@contextlib.contextmanager
def mlflow_of_up(command: str, args: list[str]) -> Iterator[str | None]:
    """While ``command`` runs, ``$MLFLOW_TRACKING_URI`` = the running ``lorafleet up`` cluster's MLflow server, unless
    the user named one (``--tracking-uri``, ``$MLFLOW_TRACKING_URI``); yields the URI it set, or None."""
    named = os.environ.get("MLFLOW_TRACKING_URI") or any(
        a == "--tracking-uri" or a.startswith("--tracking-uri=") for a in args
    )
    if command not in MLFLOW_COMMANDS or named:
        yield None
        return
    from training.cluster_state import ClusterState

    state = ClusterState.load()
    if state is None or not state.mlflow_running():
        yield None
        return
    os.environ["MLFLOW_TRACKING_URI"] = state.mlflow_uri
    try:
        yield state.mlflow_uri
    finally:
        os.environ.pop("MLFLOW_TRACKING_URI", None)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    quiet_libraries()  # before anything imports diffusers: no torchvision notice, no loading bars
    parser = argparse.ArgumentParser(
        prog="lorafleet",
        description="Turn a folder of images into a served LoRA adapter on a Ray cluster.",
        epilog="\n".join(f"  {name:{max(map(len, COMMANDS))}s}  {help_}" for name, (_, help_) in COMMANDS.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("command", choices=sorted(COMMANDS), help="what to do; `lorafleet COMMAND --help` for more")
    if not argv or argv[0] in {"-h", "--help"}:
        parser.print_help()
        return 0 if argv else 2
    if argv[0] not in COMMANDS:
        parser.print_usage(sys.stderr)
        print(f"lorafleet: unknown command {argv[0]!r}; choose one of {', '.join(sorted(COMMANDS))}", file=sys.stderr)
        return 2
    # the owning module parses the rest, so `lorafleet X --help` shows that module's options
    from cluster.jobs import JobError, NoCluster
    from training.configuration import ConfigError

    try:
        with mlflow_of_up(argv[0], argv[1:]):
            return COMMANDS[argv[0]][0](argv[1:])
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except JobError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3 if isinstance(exc, NoCluster) else 1
    except BrokenPipeError:  # `lorafleet validate DIR | head`: the reader left; no traceback (Python's own recipe,
        # docs.python.org/3/library/signal.html#note-on-sigpipe: stdout to devnull so the exit flush cannot fail)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
