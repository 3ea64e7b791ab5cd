"""Continuing an adapter through the jobs API (serving/finetune/continued.py): ``model`` = an adapter resolves for
the tenant, the job holds a copy and trains from it with the LoRA's shape pinned (validated by the real TuneConfig),
registers a new version under the same name, and mixes in the earlier job's data when asked; refusals are 400/404.
The fake cluster and the HTTP fixture are tests/serving/test_finetune.py's."""

from __future__ import annotations

import asyncio
import io
import json

import pytest
import torch

from serving.adapters import ResolvedAdapter, UnknownModel
from serving.finetune.jobs import Hyperparameters, search_overrides
from serving.tenants import owner_of
from tests.serving.test_finetune import KEY, PASSED, http, load_tune, tune_cfg, write_summary  # noqa: F401
from training.adapter import AdapterMeta, save_adapter, verify_adapter
from training.configuration import ConfigError


@pytest.fixture(scope="module")
def adapter(repo, tmp_path_factory):
    """A rank-4, alpha-8 adapter of the toy base model, as training saves one."""
    from training.config import LoraArgs
    from training.model import add_lora, load_parts

    parts = load_parts(str(repo / "models" / "toy-sd"), torch.device("cpu"))
    add_lora(parts, LoraArgs(rank=4, alpha=8))
    meta = AdapterMeta(
        base_model="models/toy-sd", rank=4, alpha=8.0, target_modules=["to_k", "to_out.0", "to_q", "to_v"]
    )
    return save_adapter(tmp_path_factory.mktemp("adapter") / "a", parts.unet, meta, family=parts.family.name)


class Registry:
    """The resolver's answers without MLflow: ``<tenant>--…`` names are their tenant's (another's is UnknownModel,
    as ``serving.adapters.AdapterResolver.resolve`` raises it); each resolves to version ``version``."""

    def __init__(self, folder, version: str = "3"):
        self.folder, self.version, self.asked = folder, version, []

    def resolve(self, name, tenant):
        self.asked.append((name, tenant.name))
        if owner_of(name) != tenant.name:
            raise UnknownModel(f"model {name!r} is not served here")
        registered = name.split("@")[0].split("/")[0]
        return ResolvedAdapter(name, f"models:/{registered}/{self.version}", self.folder, verify_adapter(self.folder),
                               self.version, registered)  # fmt: skip


def tune_overrides(record) -> list[str]:
    [line] = [o for o in record.overrides if o.startswith("tune.overrides=")]
    return json.loads(line.removeprefix("tune.overrides="))


def succeed(h, job_id: str, model: str, version: str) -> None:
    h.ft.queue.tick()
    write_summary(h.ft.store, job_id, {**PASSED, "register": {"status": "done", "model": model, "version": version}})
    h.cluster.jobs[job_id] = "SUCCEEDED"
    h.ft.queue.tick()


def test_a_job_continues_the_tenants_adapter_as_a_new_version_with_its_earlier_data(http, toy_dataset, adapter, repo):  # noqa: F811, E501
    openai = pytest.importorskip("openai")
    from tests.serving.test_files import tar_bytes

    http.ft._resolver = Registry(adapter)
    client = openai.OpenAI(base_url="http://testserver/v1", api_key=KEY, http_client=http.client, max_retries=0)
    first = client.files.create(file=("a.tar.gz", tar_bytes(toy_dataset)), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(model="base", training_file=first.id, suffix="my-style")
    succeed(http, job.id, "default--my-style", "3")
    assert client.fine_tuning.jobs.retrieve(job.id).status == "succeeded"

    new = client.files.create(file=("b.tar.gz", tar_bytes(toy_dataset)), purpose="fine-tune")
    more = client.fine_tuning.jobs.create(
        model="default--my-style", training_file=new.id, seed=1, hyperparameters={"n_epochs": 2},
        extra_body={"mix_previous_data": True},
    )  # fmt: skip
    assert more.model == "default--my-style" and more.model_extra["continued_from"] == "default--my-style/3"
    record = http.ft.store.load(more.id)
    assert record.fine_tuned_model == "default--my-style" and record.previous_data_job == job.id  # a new version
    folder = http.ft.store.folder(more.id)
    assert verify_adapter(folder / "init_adapter").sha256 == verify_adapter(adapter).sha256  # its own copy
    rows = [json.loads(line) for line in (folder / "data" / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == 16 and {r["file_name"].split("/")[0] for r in rows} == {"new", "previous"}
    assert all((folder / "data" / r["file_name"]).is_file() for r in rows)
    assert any(e.message.startswith("8 earlier images of " + job.id) for e in record.events)

    cfg = load_tune(repo, tune_overrides(record))  # the real TuneConfig accepts what the job runs
    lora = cfg.trial.lora
    assert (lora.rank, lora.alpha, lora.init_adapter) == (4, 8.0, str(folder / "init_adapter"))
    assert cfg.search.algorithm == "optuna" and "lora.rank" not in cfg.space and cfg.trial.train.epochs == 2

    # without mix_previous_data: the new images only; another suffix registers another name
    plain = client.fine_tuning.jobs.create(model="default--my-style", training_file=new.id, suffix="fork")
    record = http.ft.store.load(plain.id)
    assert record.fine_tuned_model == "default--fork" and record.previous_data_job is None
    assert len((http.ft.store.folder(plain.id) / "data" / "metadata.jsonl").read_text().splitlines()) == 8

    # images without captions are captioned by the job's first stage: too late to mix them with captioned ones
    from tests.serving.test_finetune_events import images_only_tar

    bare = client.files.create(file=("c.tar.gz", images_only_tar(toy_dataset)), purpose="fine-tune")
    with pytest.raises(openai.BadRequestError) as refused:
        client.fine_tuning.jobs.create(model="default--my-style", training_file=bare.id,
                                       extra_body={"mix_previous_data": True, "trigger": "sks"})  # fmt: skip
    assert refused.value.body["param"] == "mix_previous_data" and "without captions" in refused.value.body["message"]


def test_refusals_name_the_field(http, toy_dataset, adapter):  # noqa: F811
    openai = pytest.importorskip("openai")
    from tests.serving.test_files import tar_bytes

    http.ft._resolver = Registry(adapter, version="5")  # a version no job of this server produced
    client = openai.OpenAI(base_url="http://testserver/v1", api_key=KEY, http_client=http.client, max_retries=0)
    file = client.files.create(file=("a.tar.gz", tar_bytes(toy_dataset)), purpose="fine-tune")
    with pytest.raises(openai.BadRequestError, match="hyperparameters.rank=8 but the adapter in model has rank 4"):
        client.fine_tuning.jobs.create(model="default--x", training_file=file.id, hyperparameters={"rank": 8})
    with pytest.raises(openai.BadRequestError, match="earlier data of model default--x/5 cannot be found") as info:
        client.fine_tuning.jobs.create(
            model="default--x", training_file=file.id, extra_body={"mix_previous_data": True}
        )
    assert info.value.body["param"] == "mix_previous_data"
    with pytest.raises(openai.BadRequestError, match="mix_previous_data needs model = an adapter"):
        client.fine_tuning.jobs.create(model="base", training_file=file.id, extra_body={"mix_previous_data": True})
    with pytest.raises(openai.NotFoundError, match="no model 'globex--theirs'"):  # another tenant's: as a missing one
        client.fine_tuning.jobs.create(model="globex--theirs", training_file=file.id)
    assert client.fine_tuning.jobs.list().data == []  # nothing was created by a refusal
    ok = client.fine_tuning.jobs.create(model="default--x", training_file=file.id, hyperparameters={"rank": 4})
    assert ok.status == "queued"


def test_a_configured_adapter_resolves_through_the_servers_resolver(monkeypatch, tmp_path, toy_dataset, adapter):
    """No fake: ``serving.adapters.AdapterResolver`` resolves an operator's configured adapter for any tenant; it
    was made by no job here, so it registers under the tenant's own name and has no earlier data."""
    from serving.config import ServeArgs
    from serving.finetune.jobs import CreateJobBody
    from serving.finetune.routes import FineTuning, JobRequestError
    from serving.uploads.store import FileStore
    from tests.serving.test_files import tar_bytes

    args = ServeArgs(champion={"model": None}, default_model="base", adapters={"house-style": str(adapter)},
                     adapter_roots=[str(adapter.parent)],
                     files={"root": str(tmp_path / "files")})  # fmt: skip
    files = FileStore(args.files)
    upload = asyncio.run(files.create(io.BytesIO(tar_bytes(toy_dataset)), "a.tar.gz", "fine-tune", "acme"))
    ft = FineTuning(args, files)
    record = ft.build(CreateJobBody(model="house-style", training_file=upload.id), "acme")
    assert record.fine_tuned_model.startswith("acme--ft-") and record.continued_from == "house-style"
    assert verify_adapter(ft.store.folder(record.id) / "init_adapter").rank == 4
    with pytest.raises(JobRequestError, match="cannot be found"):
        ft.build(CreateJobBody(model="house-style", training_file=upload.id, mix_previous_data=True), "acme")


def test_pinned_shape_leaves_the_search_and_the_grid(repo, tune_cfg):  # noqa: F811
    pinned = {"lora.rank": 4, "lora.alpha": 8.0, "lora.init_adapter": "/x/init_adapter"}
    auto = load_tune(repo, search_overrides(Hyperparameters(), tune_cfg, 3, 0, pinned))
    assert "lora.rank" not in auto.space and auto.trial.lora.rank == 4 and auto.search.num_samples == 3
    fixed = Hyperparameters(n_epochs=3, learning_rate_multiplier=1.0, batch_size=2, rank=4, optimizer="adamw")
    one = load_tune(repo, search_overrides(fixed, tune_cfg, 3, 0, pinned))
    assert one.search.algorithm == "grid" and "lora.rank" not in one.grid and one.trial.lora.init_adapter


def test_a_search_over_a_continued_adapters_shape_is_refused(repo):
    with pytest.raises(ConfigError, match="'lora.rank' cannot be searched while trial.lora.init_adapter"):
        load_tune(repo, ["trial.lora.init_adapter=/x/adapter"])  # configs/tune.yaml searches lora.rank
