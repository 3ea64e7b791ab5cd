"""The engine without Ray: mixed-adapter batches, LRU, seeds, grouping, limits, cancellation, champion reload."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from serving.adapters import AdapterUnavailable, UnknownModel
from serving.engine import Cancelled, Engine, ImageRequest, RequestError

PROMPT = "a red circle on a sks background"


def pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def run(engine: Engine, *reqs: ImageRequest):
    results = engine.generate([engine.prepare(r) for r in reqs])
    for r in results:
        assert not isinstance(r, Exception), r
    return results


def test_mixed_batch_matches_single_adapter_runs(engine):
    models = ["ad0", "base", "ad1", "ad0", "ad2", "base", "ad3"]
    reqs = [ImageRequest(PROMPT, model=m, seed=10 + i) for i, m in enumerate(models)]
    mixed = run(engine, *reqs)
    assert {r.pass_id for r in mixed} == {mixed[0].pass_id} and mixed[0].batch_images == len(models)  # one pass
    for req, got in zip(reqs, mixed):
        [alone] = run(engine, req)
        assert alone.batch_images == 1
        assert np.abs(pixels(got.images[0]) - pixels(alone.images[0])).max() <= 1, req.model
    # the routing matters: the same seed through another adapter (or none) draws a different image
    same_seed = run(engine, *[ImageRequest(PROMPT, model=m, seed=0) for m in ("base", "ad0", "ad1")])
    base, a0, a1 = (pixels(r.images[0]) for r in same_seed)
    assert np.abs(base - a0).mean() > 2 and np.abs(a0 - a1).mean() > 2


def test_lru_holds_at_most_max_adapters_and_evicts_the_least_recently_used(serve_args):
    engine = Engine.from_args(serve_args(max_adapters=2))
    for model in ("ad0", "ad1", "ad0", "ad2"):  # ad1 is the least recently used when ad2 arrives
        run(engine, ImageRequest(PROMPT, model=model, seed=1, steps=1))
    stats = engine.stats()
    assert stats == {"loaded": 2, "hits": 1, "misses": 3, "evictions": 1}
    slots = set(engine.pipe.unet.peft_config)
    ad0, ad1, ad2 = (engine.resolver.resolve(n).key for n in ("ad0", "ad1", "ad2"))
    assert slots == {engine.adapters.slot_name(ad0), engine.adapters.slot_name(ad2)}
    assert ad1 not in engine.adapters
    lora_params = sum(p.numel() for n, p in engine.pipe.unet.named_parameters() if "lora_" in n)
    run(engine, ImageRequest(PROMPT, model="ad3", seed=1, steps=1))  # evicts ad0: memory stays at two adapters
    assert sum(p.numel() for n, p in engine.pipe.unet.named_parameters() if "lora_" in n) == lora_params


def test_three_adapters_with_room_for_two_run_as_two_passes(serve_args):
    engine = Engine.from_args(serve_args(max_adapters=2))
    reqs = [ImageRequest(PROMPT, model=m, seed=i, steps=1) for i, m in enumerate(["ad0", "ad1", "base", "ad2"])]
    assert engine.plan([engine.prepare(r) for r in reqs]) == [[0, 1, 2], [3]]
    results = run(engine, *reqs)
    assert [r.batch_images for r in results] == [3, 3, 3, 1]


def test_without_mixed_batches_each_pass_holds_one_adapter(serve_args):
    engine = Engine.from_args(serve_args(**{"batching.mixed_adapters": False}))
    reqs = [ImageRequest(PROMPT, model=m, seed=i) for i, m in enumerate(["ad0", "ad1", "ad0", "base"])]
    assert engine.plan([engine.prepare(r) for r in reqs]) == [[0, 2], [1], [3]]


def test_seeds_make_images_reproducible(engine):
    a, b = run(engine, ImageRequest(PROMPT, model="ad0", seed=5, n=2), ImageRequest(PROMPT, model="ad0", seed=6))
    assert a.seeds == [5, 6] and b.seeds == [6]
    assert np.abs(pixels(a.images[1]) - pixels(b.images[0])).max() <= 1  # image i of a request uses seed + i
    assert np.abs(pixels(a.images[0]) - pixels(a.images[1])).mean() > 2
    a2, _ = run(engine, ImageRequest(PROMPT, model="ad0", seed=5, n=2), ImageRequest(PROMPT, model="ad0", seed=6))
    assert np.array_equal(pixels(a2.images[0]), pixels(a.images[0]))  # the same pass again: the same pixels
    # alone in its pass: the same image up to rounding (CPU kernels may sum in another order for another batch size)
    [again] = run(engine, ImageRequest(PROMPT, model="ad0", seed=5))
    assert np.abs(pixels(again.images[0]) - pixels(a.images[0])).max() <= 1
    [random_seed] = run(engine, ImageRequest(PROMPT))
    assert 0 <= random_seed.seeds[0] < 2**31


def test_requests_of_different_sizes_and_steps_run_as_sub_batches(engine):
    reqs = [
        ImageRequest(PROMPT, model="ad0", seed=1, width=64, height=64),
        ImageRequest(PROMPT, model="ad1", seed=2, width=32, height=48),
        ImageRequest(PROMPT, model="base", seed=3, width=64, height=64),
        ImageRequest(PROMPT, model="ad0", seed=4, steps=2),
    ]
    assert engine.plan([engine.prepare(r) for r in reqs]) == [[0, 2], [1], [3]]
    results = run(engine, *reqs)
    assert [r.images[0].size for r in results] == [(64, 64), (32, 48), (64, 64), (64, 64)]
    assert [r.batch_images for r in results] == [2, 1, 2, 1]


@pytest.mark.parametrize(
    ("request_kwargs", "field"),
    [
        ({"prompt": ""}, "prompt"),
        ({"prompt": "   "}, "prompt"),
        ({"prompt": "x" * 501}, "prompt"),
        ({"negative_prompt": "x" * 501}, "negative_prompt"),
        ({"n": 0}, "n"),
        ({"n": 5}, "n"),
        ({"steps": 0}, "steps"),
        ({"steps": 51}, "steps"),
        ({"guidance": float("nan")}, "guidance"),
        ({"guidance": -1.0}, "guidance"),
        ({"width": 65}, "width"),
        ({"height": 4096}, "height"),
        ({"width": 16}, "width"),
        ({"seed": -1}, "seed"),
    ],
)
def test_requests_outside_the_limits_name_their_field(engine, request_kwargs, field):
    req = ImageRequest(**({"prompt": PROMPT} | request_kwargs))
    with pytest.raises(RequestError) as err:
        engine.prepare(req)
    assert err.value.field == field


def test_the_seed_bound_in_the_error_is_the_one_enforced(engine):
    """Image i uses seed + i: the largest seed is 2^63 - max_n - 1, and the message states that number."""
    top = 2**63 - engine.args.limits.max_n - 1
    assert engine.prepare(ImageRequest(PROMPT, seed=top)).seed == top
    with pytest.raises(RequestError) as err:
        engine.prepare(ImageRequest(PROMPT, seed=top + 1))
    assert err.value.field == "seed" and f"outside 0..{top}:" in str(err.value), err.value


@pytest.mark.parametrize("model", ["nope", "../../etc/passwd", "/etc", "ad0/../../x", "toy@champion"])
def test_clients_name_models_not_paths(engine, model):
    with pytest.raises(UnknownModel):
        engine.prepare(ImageRequest(PROMPT, model=model))


def test_a_request_whose_clients_left_stops_at_the_next_step(engine):
    calls = []

    def gone() -> bool:
        calls.append(1)
        return len(calls) >= 2

    with pytest.raises(Cancelled, match="step 2/20"):
        engine.generate([engine.prepare(ImageRequest(PROMPT, steps=20))], should_stop=gone)
    assert len(calls) == 2
    assert not isinstance(run(engine, ImageRequest(PROMPT, model="ad0", seed=1))[0], Exception)  # still serves


def test_a_bad_adapter_fails_alone(serve_args, tiny_adapters, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny_adapters["ad0"], bad)
    with open(bad / "pytorch_lora_weights.safetensors", "r+b") as f:
        f.seek(-8, 2)
        f.write(b"tampered")
    engine = Engine.from_args(serve_args(**{"adapters.bad": str(bad)}))
    from training.adapter import AdapterError

    with pytest.raises(AdapterError, match="sha256"):
        engine.prepare(ImageRequest(PROMPT, model="bad"))
    assert run(engine, ImageRequest(PROMPT, model="ad1", seed=1))[0].images


def test_registry_names_need_a_tracking_uri(serve_args, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    engine = Engine.from_args(serve_args(**{"champion.model": "toy", "default_model": "base"}))
    with pytest.raises(AdapterUnavailable, match="MLFLOW_TRACKING_URI"):
        engine.prepare(ImageRequest(PROMPT, model="champion"))
    assert run(engine, ImageRequest(PROMPT, seed=1))[0].model == "base"  # the base model still serves


def test_the_champion_follows_its_registry_alias(serve_args, tiny_adapters, mlflow_server):
    from tests.serving.conftest import register_adapter

    v1 = register_adapter(mlflow_server, "eng-champ", tiny_adapters["ad0"])
    args = serve_args(**{"champion.model": "eng-champ", "champion.poll_s": 3600, "tracking_uri": mlflow_server})
    engine = Engine.from_args(args)
    [first] = run(engine, ImageRequest(PROMPT, model="champion", seed=1))
    assert first.version == v1
    v2 = register_adapter(mlflow_server, "eng-champ", tiny_adapters["ad1"])
    assert run(engine, ImageRequest(PROMPT, model="champion", seed=1))[0].version == v1  # cached until refresh
    assert engine.resolver.refresh() == {"champion": v2}
    [second] = run(engine, ImageRequest(PROMPT, model="champion", seed=1))
    [ad1] = run(engine, ImageRequest(PROMPT, model="ad1", seed=1))
    assert second.version == v2 and np.array_equal(pixels(second.images[0]), pixels(ad1.images[0]))
    # a pinned version and another alias are registry names too
    assert run(engine, ImageRequest(PROMPT, model=f"eng-champ/{v1}", seed=1))[0].version == v1
    assert run(engine, ImageRequest(PROMPT, model="eng-champ@previous", seed=1))[0].version == v1


def test_steps_are_bounded_by_the_scheduler_too(serve_args):
    engine = Engine.from_args(serve_args(**{"limits.max_steps": 5000}))
    for steps in (1000, 1001, 4000):  # DDIM, 1000 training steps: 1000 would index timestep 1000
        with pytest.raises(RequestError, match="scheduler"):
            engine.prepare(ImageRequest(PROMPT, steps=steps))
    assert engine.prepare(ImageRequest(PROMPT, steps=999)).steps == 999


def _bad_adapters(good: Path, root: Path) -> dict[str, Path]:
    """Copies of a good adapter made wrong in the ways a replica must refuse: name -> folder."""
    import json
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from training.adapter import META_NAME, WEIGHTS_NAME, file_sha256

    def copy(name: str) -> Path:
        shutil.copytree(good, root / name)
        return root / name

    def rewrite_meta(folder: Path, **changes) -> None:
        meta = json.loads((folder / META_NAME).read_text())
        meta.update(sha256=file_sha256(folder / WEIGHTS_NAME), **changes)
        (folder / META_NAME).write_text(json.dumps(meta))

    out = {"pickled": copy("pickled"), "shapes": copy("shapes"), "otherbase": copy("otherbase")}
    out["tampered"] = copy("tampered")
    torch.save({"lora": torch.zeros(2)}, out["pickled"] / "pytorch_lora_weights.bin")  # a pickle beside it
    tensors = load_file(out["shapes"] / WEIGHTS_NAME)
    key = next(k for k in sorted(tensors) if "lora_A" in k or "lora.down" in k)
    tensors[key] = torch.zeros(tensors[key].shape[0], tensors[key].shape[1] + 3)  # the wrong input width
    save_file(tensors, out["shapes"] / WEIGHTS_NAME)
    rewrite_meta(out["shapes"])  # the hash is right: only loading can tell
    rewrite_meta(out["otherbase"], base_model="stable-diffusion-v1-5/stable-diffusion-v1-5")
    with open(out["tampered"] / WEIGHTS_NAME, "r+b") as f:
        f.seek(-8, 2)
        f.write(b"tampered")
    return out


def test_refused_adapters_say_why_and_the_replica_keeps_serving_the_others(serve_args, tiny_adapters, tmp_path):
    from serving.app import error_result
    from training.adapter import AdapterError

    bad = _bad_adapters(tiny_adapters["ad0"], tmp_path)
    engine = Engine.from_args(serve_args(**{f"adapters.{k}": str(v) for k, v in bad.items()}, max_adapters=2))
    expected = {
        "pickled": "only safetensors adapters are loaded",
        "tampered": "sha256",
        "otherbase": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    }
    for name, words in expected.items():  # refused when the name is resolved, before any pass
        with pytest.raises(AdapterError, match=words) as info:
            engine.prepare(ImageRequest(PROMPT, model=name))
        assert error_result(info.value)["error"]["status"] == 422

    # wrong tensor shapes pass verification; loading fails, in a pass shared with a good adapter
    solo = run(engine, ImageRequest(PROMPT, model="ad1", seed=3))[0]
    pair = [ImageRequest(PROMPT, model="shapes", seed=3), ImageRequest(PROMPT, model="ad1", seed=3)]
    mixed = engine.generate([engine.prepare(r) for r in pair])
    assert isinstance(mixed[0], AdapterError) and "do not fit base model" in str(mixed[0])
    assert error_result(mixed[0])["error"]["status"] == 422
    assert np.abs(pixels(mixed[1].images[0]) - pixels(solo.images[0])).max() <= 1  # the good request is unharmed
    loaded = set(engine.pipe.unet.peft_config)
    assert len(loaded) == len(engine.adapters) == 1, loaded  # nothing half-loaded stays in the UNet
    assert run(engine, ImageRequest(PROMPT, model="ad2", seed=1), ImageRequest(PROMPT, model="base", seed=1))


def test_adapter_folders_must_lie_in_the_configured_roots(serve_args, tiny_adapters, tiny_pipe_dir, tmp_path):
    import shutil

    from training.adapter import AdapterError
    from training.configuration import ConfigError

    roots = {"adapter_roots": [str(tmp_path / "allowed")]}
    allowed = tmp_path / "allowed"
    shutil.copytree(tiny_adapters["ad0"], allowed / "ok")
    with pytest.raises(ConfigError) as err:  # a folder outside, also spelled with ../
        serve_args(**roots, **{"adapters.out": str(tiny_adapters["ad1"]), "adapters.dots": f"{allowed}/../../x"})
    text = "\n".join(err.value.problems)
    assert "adapters.out:" in text and "adapters.dots:" in text and "outside adapter_roots" in text

    (allowed / "linked").symlink_to(tiny_adapters["ad2"])  # a symlink in the root pointing out of it
    with pytest.raises(ConfigError, match="adapters.linked: .* is outside adapter_roots"):
        serve_args(**roots, **{"adapters.linked": str(allowed / "linked")})

    from tests.serving.conftest import tiny_serve_args

    args = tiny_serve_args(tiny_pipe_dir, {"ok": allowed / "ok"}, tmp_path / "cache", warmup=False, **roots)
    engine = Engine.from_args(args)
    weights = allowed / "ok" / "pytorch_lora_weights.safetensors"
    weights.rename(allowed / "ok.weights")
    (tmp_path / "elsewhere.safetensors").write_bytes((allowed / "ok.weights").read_bytes())
    weights.symlink_to(tmp_path / "elsewhere.safetensors")  # swapped after start-up
    with pytest.raises(AdapterError, match="links outside adapter_roots"):
        engine.prepare(ImageRequest(PROMPT, model="ok"))
