"""The file store behind POST /v1/files: good archives become validated datasets; hostile ones leave nothing.

Unit tests drive ``FileStore`` directly; the HTTP tests run the ingress in process as tests/serving/test_http.py
does (Starlette's TestClient, the replica context monkeypatched), with httpx multipart and the openai client.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import stat
import struct
import tarfile
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

from serving.config import FilesArgs
from serving.uploads.archive import ArchiveError, NotAnArchive
from serving.uploads.store import DatasetRejected, FileNotFound, FileStore, InvalidUpload, UploadTooLarge

KEY_ENV, KEY = "LORAFLEET_TEST_FILES_KEY", "files-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


def make_store(root: Path, **limits) -> FileStore:
    return FileStore(FilesArgs(**limits), root=root, clock=lambda: 1_700_000_000.0)


def create(store: FileStore, data: bytes, name: str = "data.zip", tenant: str = "acme", chunk: int = 4096):
    """``store.create`` fed ``data`` as an async stream of ``chunk``-byte pieces."""

    async def stream():
        for i in range(0, len(data), chunk):
            yield data[i : i + chunk]

    return asyncio.run(store.create(stream(), name, "fine-tune", tenant))


def zip_bytes(entries: dict[str, bytes], folder: Path | None = None, prefix: str = "") -> bytes:
    """A zip of ``folder``'s files under ``prefix`` plus ``entries`` (name -> bytes, deflated)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for p in sorted(folder.rglob("*")) if folder else ():
            if p.is_file():
                z.write(p, prefix + p.relative_to(folder).as_posix())
        for name, data in entries.items():
            z.writestr(name, data)
    return buf.getvalue()


def tar_bytes(folder: Path | None, mode: str = "w:gz", members: list[tuple[tarfile.TarInfo, bytes]] = ()) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as t:
        if folder:
            t.add(folder, arcname=folder.name)
        for info, data in members:
            info.size = len(data) if info.isreg() else 0
            t.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return buf.getvalue()


def member(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    return info


def left_behind(root: Path) -> list[str]:
    """Everything under the store's root but empty folders: a refused upload must leave nothing."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()) if root.exists() else []


def png(seed: int = 0) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (seed * 40 % 256, 90, 200)).save(buf, "PNG")
    return buf.getvalue()


# ---- good archives ----------------------------------------------------------------------------------------------
def test_a_zipped_dataset_folder_is_unpacked_validated_persisted_and_kept_per_tenant(tmp_path, toy_dataset):
    store = make_store(tmp_path / "files")
    data = zip_bytes({}, toy_dataset, prefix="toy-sks/")  # what zipping a folder makes: one folder at the top
    file = create(store, data, "C:\\Users\\me\\toy-sks.zip")
    assert file.object == "file" and file.id.startswith("file-") and file.status == "processed"
    assert (file.bytes, file.created_at, file.filename, file.purpose) == (len(data), 1_700_000_000, "toy-sks.zip",
                                                                          "fine-tune")  # fmt: skip
    facts = file.dataset
    assert (facts.layout, facts.root, facts.images, facts.captions, facts.archive) == ("metadata", "toy-sks", 8,
                                                                                       True, "zip")  # fmt: skip
    assert not [p for p in facts.problems if p.severity == "error"]
    folder = store.data_dir(file.id, "acme")
    assert (folder / "metadata.jsonl").read_bytes() == (toy_dataset / "metadata.jsonl").read_bytes()
    assert not (tmp_path / "files" / file.id / "upload").exists()  # only the unpacked data is kept

    again = make_store(tmp_path / "files")  # a restarted Serve app reads the same root
    assert again.get(file.id, "acme") == file and again.list("acme") == [file]
    with pytest.raises(FileNotFound):
        again.get(file.id, "globex")  # another tenant's file is not found, not forbidden
    assert again.list("globex") == [] and again.list("acme", purpose="batch") == []
    with pytest.raises(FileNotFound):
        again.delete(file.id, "globex")
    again.delete(file.id, "acme")
    assert not (tmp_path / "files" / file.id).exists() and again.list("acme") == []
    with pytest.raises(FileNotFound):
        again.get(file.id, "acme")


@pytest.mark.parametrize("mode", ["w:gz", "w:bz2", "w:xz", "w"])
def test_a_tar_of_any_compression_is_recognised_by_its_bytes_not_its_name(tmp_path, toy_dataset, mode):
    store = make_store(tmp_path / "files")
    with open(tmp_path / "upload.bin", "wb") as f:
        f.write(tar_bytes(toy_dataset, mode))
    with open(tmp_path / "upload.bin", "rb") as f:  # a binary file works as the stream too
        file = asyncio.run(store.create(f, "dataset.zip", "fine-tune", "acme"))  # the name says zip: ignored
    assert file.status == "processed" and file.dataset.images == 8
    assert file.dataset.archive == {"w:gz": "tar.gz", "w:bz2": "tar.bz2", "w:xz": "tar.xz", "w": "tar"}[mode]


def test_images_without_captions_are_accepted_for_the_job_to_caption(tmp_path):
    store = make_store(tmp_path / "files")
    file = create(store, zip_bytes({f"img{i}.png": png(i) for i in range(5)}))
    assert file.status == "processed" and (file.dataset.layout, file.dataset.captions) == ("images", False)
    assert file.dataset.images == 5


# ---- refused uploads --------------------------------------------------------------------------------------------
RANDOM = os.urandom(4096)  # incompressible


def _symlink_zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("a.png", png())
        link = zipfile.ZipInfo("b.png")
        link.create_system, link.external_attr = 3, (stat.S_IFLNK | 0o777) << 16
        z.writestr(link, "/etc/passwd")
    return buf.getvalue()


def _lying_zip(trick: str, n: int = 5000) -> bytes:
    """A zip of ``n`` central-directory records whose classic end record claims a tiny directory, while what
    ``zipfile`` reads says ``n`` records: ``zip64``, a zip64 end record right before the locator (where ``zipfile``
    reads it; the locator's own offset points elsewhere); ``echo``, the end record's offset field holding the
    end-record signature (a backwards search for it lands inside the record)."""
    local = struct.pack("<4s5H3I2H", b"PK\x03\x04", 20, 0, 0, 0, 0, 0, 0, 0, 1, 0) + b"a"
    record = struct.pack("<4s6H3I5H2I", b"PK\x01\x02", 20, 20, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0) + b"a"
    cd, start = record * n, len(local)
    if trick == "zip64":
        z64 = struct.pack("<4sQ2H2I4Q", b"PK\x06\x06", 44, 45, 45, 0, 0, n, n, len(cd), start)
        locator = struct.pack("<4sIQI", b"PK\x06\x07", 0, 12345678, 1)
        return local + cd + z64 + locator + struct.pack("<4s4H2IH", b"PK\x05\x06", 0, 0, 1, 1, 47, start, 0)
    end = struct.pack("<4s4H2IH", b"PK\x05\x06", 0, 0, n, n, len(cd), 0, 0)
    return local + cd + end[:16] + b"PK\x05\x06" + end[20:]


def _pax_tar(payloads: list[bytes]) -> bytes:
    """A plain tar: one PAX extended header per payload (raw, as a hostile archiver writes it), then ``a.png``."""
    out = b""
    for data in payloads:
        header = tarfile.TarInfo("././@PaxHeader")
        header.type, header.size = tarfile.XHDTYPE, len(data)
        out += header.tobuf(tarfile.USTAR_FORMAT) + data + b"\0" * (-len(data) % 512)
    image = png()
    info = tarfile.TarInfo("a.png")
    info.size = len(image)
    return out + info.tobuf(tarfile.USTAR_FORMAT) + image + b"\0" * (-len(image) % 512) + b"\0" * 1024


HOSTILE = {
    "zip traversal": (lambda: zip_bytes({"a.png": png(), "../evil.png": png()}), {}, "'..'"),
    "zip absolute": (lambda: zip_bytes({"/tmp/evil.png": png()}), {}, "absolute"),
    "zip drive letter": (lambda: zip_bytes({"C:\\evil.png": png()}), {}, "absolute"),
    "zip symlink": (_symlink_zip, {}, "symbolic link"),
    "zip duplicate name": (lambda: zip_bytes({"a.png": png(), "./a.png": png(1)}), {}, "given twice"),
    "zip bomb (ratio)": (lambda: zip_bytes({"a.png": b"\0" * (4 << 20)}), {}, "zip bomb"),
    "zip too many entries": (
        lambda: zip_bytes({f"{i}.png": png() for i in range(6)}),
        {"max_entries": 5},
        "more than 5 entries",
    ),  # fmt: skip
    "zip central directory": (
        lambda: zip_bytes({f"{i:03d}-{'x' * 40}.png": b"" for i in range(800)}),  # > 64 KiB of records
        {"max_entries": 2},
        "central directory",
    ),  # fmt: skip
    "zip entry too large": (lambda: zip_bytes({"a.png": RANDOM}), {"max_entry_bytes": 2048}, "max_entry_bytes"),
    "zip total too large": (
        lambda: zip_bytes({f"{i}.png": RANDOM[:2000] for i in range(3)}),
        {"max_entry_bytes": 2048, "max_extracted_bytes": 4096},
        "max_extracted_bytes",
    ),  # fmt: skip
    "tar traversal": (lambda: tar_bytes(None, members=[(member("x/../../evil.png"), png())]), {}, "'..'"),
    "tar absolute": (lambda: tar_bytes(None, members=[(member("/etc/evil"), b"x")]), {}, "absolute"),
    "tar symlink": (
        lambda: tar_bytes(None, members=[(member("a.png", tarfile.SYMTYPE, "/etc/passwd"), b"")]),
        {},
        "symbolic link",
    ),  # fmt: skip
    "tar hardlink": (
        lambda: tar_bytes(None, members=[(member("a.png"), png()), (member("b.png", tarfile.LNKTYPE, "a.png"), b"")]),
        {},
        "hard link",
    ),  # fmt: skip
    "tar device": (lambda: tar_bytes(None, members=[(member("dev", tarfile.CHRTYPE), b"")]), {}, "device"),
    "tar.gz bomb (ratio)": (
        lambda: tar_bytes(None, members=[(member("a.png"), b"\0" * (4 << 20))]),
        {},
        "zip bomb",
    ),  # fmt: skip
    "tar too many entries": (
        lambda: tar_bytes(None, "w", [(member(f"{i}.png"), b"x") for i in range(6)]),
        {"max_entries": 5},
        "more than 5 entries",
    ),  # fmt: skip
    # zipfile reads the central directory at the size its end records give; a second parser of them was fooled
    "zip64 end record before the locator lies": (
        lambda: _lying_zip("zip64"),
        {"max_entries": 100},
        "central directory",
    ),
    "zip end record's signature inside itself": (lambda: _lying_zip("echo"), {"max_entries": 100}, "central directory"),
    "zip name too long for the file system": (lambda: zip_bytes({"a" * 300 + ".png": png()}), {}, "too long"),
    "tar name too long for the file system": (
        lambda: tar_bytes(None, "w", [(member("d" * 300 + "/a.png"), png())]),
        {},
        "too long",
    ),  # fmt: skip
    "tar PAX digits (CVE-2024-6232 backtracking)": (lambda: _pax_tar([b"1" * 20000]), {}, "run of more than"),
    "tar PAX record framing": (lambda: _pax_tar([b"5 " * 4000 + b"=\n"]), {}, "not '<length> <keyword>"),
    "tar PAX headers chained past recursion": (lambda: _pax_tar([b"10 a=bcde\n"] * 3000), {}, "in a row"),
    "tar GNU long name of 200 kB": (
        lambda: tar_bytes(None, "w", [(member("L" * 200_000), b"x")]),
        {},
        "extended header",
    ),  # fmt: skip
    "tar sparse file (PAX GNU.sparse)": (
        lambda: _pax_tar([b"22 GNU.sparse.major=1\n22 GNU.sparse.minor=0\n"]),
        {},
        "sparse",
    ),  # fmt: skip
    "not an archive (a PNG)": (png, {}, "not a zip or tar"),
    "gzip without a tar": (lambda: __import__("gzip").compress(b"hello " * 100), {}, "does not hold a tar"),
    "empty upload": (lambda: b"", {}, "the file is empty"),
}


@pytest.mark.parametrize("case", list(HOSTILE), ids=list(HOSTILE))
def test_a_hostile_or_unreadable_archive_is_refused_and_leaves_nothing(tmp_path, case):
    build, limits, message = HOSTILE[case]
    store = make_store(tmp_path / "files", **limits)
    with pytest.raises(ArchiveError, match=message) as info:
        create(store, build())
    not_archives = {"not an archive (a PNG)", "gzip without a tar", "empty upload"}
    assert isinstance(info.value, NotAnArchive) == (case in not_archives)
    assert left_behind(tmp_path / "files") == [] and store.list("acme") == []
    assert not (tmp_path / "evil.png").exists() and not Path("/tmp/evil.png").exists()
    assert str(tmp_path) not in str(info.value)  # the server's paths are not the client's business


def test_an_upload_past_max_bytes_stops_mid_stream_and_leaves_nothing(tmp_path):
    store = make_store(tmp_path / "files", max_bytes=10_000)
    pulled = []

    async def stream():
        for i in range(100):  # 100 KiB offered; the store must stop reading after ~10 KB
            pulled.append(i)
            yield b"x" * 1024

    with pytest.raises(UploadTooLarge, match="files.max_bytes"):
        asyncio.run(store.create(stream(), "big.zip", "fine-tune", "acme"))
    assert len(pulled) == 10 and left_behind(tmp_path / "files") == []


def test_a_purpose_not_accepted_is_refused_before_the_body_is_read(tmp_path):
    store = make_store(tmp_path / "files")
    with pytest.raises(InvalidUpload, match="purpose 'batch'.*files.purposes"):
        asyncio.run(store.create(io.BytesIO(b"never read"), "a.zip", "batch", "acme"))
    assert not (tmp_path / "files").exists()


def test_an_archive_of_non_images_is_kept_as_an_error_file_with_the_validators_report(tmp_path):
    store = make_store(tmp_path / "files")
    with pytest.raises(DatasetRejected, match="1 error") as info:
        create(store, zip_bytes({"notes.txt": b"hello", "readme.md": b"# hi"}), "notes.zip")
    file = info.value.file
    assert file.status == "error" and "dataset error" in file.status_details
    problems = {(p.file, p.severity) for p in file.dataset.problems}
    assert (".", "error") in problems and ("readme.md", "warning") in problems  # no images; a stray file
    assert all(str(tmp_path) not in p.message for p in file.dataset.problems)  # no server paths in the report
    assert store.get(file.id, "acme") == file and store.list("acme") == [file]  # kept, so its report can be read
    assert left_behind(tmp_path / "files") == [f"{file.id}/file.json"]  # the metadata only, no data
    with pytest.raises(InvalidUpload, match="status 'error'"):
        store.data_dir(file.id, "acme")


# ---- HTTP ---------------------------------------------------------------------------------------------------
@pytest.fixture
def http(monkeypatch, tmp_path):
    """The ingress under TestClient with an API key and ``files.root`` in ``tmp_path``; tenant 'default'."""
    from fastapi.testclient import TestClient
    from ray import serve

    from serving.config import ServeArgs
    from serving.http import Api, web
    from tests.serving.test_http import FakeGenerator, Remote

    monkeypatch.setenv(KEY_ENV, KEY)
    args = ServeArgs(champion={"model": None}, default_model="base", api_key_env=KEY_ENV,
                     files={"root": str(tmp_path / "files"), "max_bytes": 200_000})  # fmt: skip
    api = Api.func_or_class.__mro__[1](Remote(FakeGenerator()), args, Remote(SimpleNamespace()))
    monkeypatch.setattr(serve, "get_replica_context", lambda: SimpleNamespace(servable_object=api))
    with TestClient(web, headers=AUTH) as client:
        yield SimpleNamespace(client=client, store=api.files, root=tmp_path / "files")


OPENAI_FILE_KEYS = {"id", "object", "bytes", "created_at", "filename", "purpose", "status", "status_details"}


def test_upload_list_retrieve_delete_over_http_in_openais_shapes(http, toy_dataset):
    data = zip_bytes({}, toy_dataset)
    r = http.client.post("/v1/files", data={"purpose": "fine-tune"}, files={"file": ("toy.zip", data, "x/y")})
    assert r.status_code == 200, r.text
    file = r.json()
    assert set(file) == OPENAI_FILE_KEYS | {"dataset"} and file["status"] == "processed" and file["bytes"] == len(data)
    assert file["dataset"]["images"] == 8 and file["filename"] == "toy.zip"
    listed = http.client.get("/v1/files").json()
    assert listed["object"] == "list" and [f["id"] for f in listed["data"]] == [file["id"]]
    assert (listed["first_id"], listed["last_id"], listed["has_more"]) == (file["id"], file["id"], False)
    assert http.client.get(f"/v1/files/{file['id']}").json() == file
    assert http.client.get("/v1/files", params={"limitt": 1}).status_code == 400  # an unknown parameter
    other = asyncio.run(http.store.create(io.BytesIO(data), "theirs.zip", "fine-tune", "globex"))
    assert http.client.get(f"/v1/files/{other.id}").status_code == 404  # another tenant's id: as if none
    assert http.client.delete(f"/v1/files/{other.id}").status_code == 404
    assert [f["id"] for f in http.client.get("/v1/files").json()["data"]] == [file["id"]]
    assert http.client.delete(f"/v1/files/{file['id']}").json() == {"id": file["id"], "object": "file",
                                                                     "deleted": True}  # fmt: skip
    gone = http.client.get(f"/v1/files/{file['id']}")
    assert gone.status_code == 404 and gone.json()["error"]["param"] == "file_id"
    assert http.client.get("/v1/files/../../etc/passwd").status_code == 404


@pytest.mark.parametrize(
    "form, files, headers, status, says",
    [
        ({"purpose": "fine-tune"}, {"file": ("n.zip", zip_bytes({"a.txt": b"x"}))}, {}, 400, "1 error"),
        ({"purpose": "assistants"}, {"file": ("a.zip", b"PK\3\4")}, {}, 400, "files.purposes"),
        ({}, {"file": ("a.zip", b"PK\3\4")}, {}, 400, "purpose: missing"),
        ({}, {"purpose": (None, "fine-tune")}, {}, 400, "file: missing"),  # multipart without a file part
        ({"purpose": "fine-tune"}, {}, {}, 415, "multipart/form-data"),  # a urlencoded form
        ({"purpose": "fine-tune", "user": "x"}, {"file": ("a.zip", b"PK")}, {}, 400, "user: is not a field"),
        ({"purpose": "fine-tune"}, {"file": ("a.png", png())}, {}, 400, "not a zip or tar"),
        ({"purpose": "fine-tune"}, {"file": ("a.zip", b"x" * 300_000)}, {}, 413, "files.max_bytes"),
    ],
)
def test_bad_uploads_get_openai_error_bodies_naming_the_problem(http, form, files, headers, status, says):
    r = http.client.post("/v1/files", data=form, files=files or None, headers=headers)
    assert r.status_code == status and says in r.json()["error"]["message"], r.text
    if status == 400 and says == "1 error":  # a rejected dataset: the stored error File and every problem
        error = r.json()["error"]
        assert error["code"] == "invalid_dataset" and error["file"]["status"] == "error"
        assert any(p["severity"] == "error" and p["file"] == "." for p in error["problems"])
    else:
        assert left_behind(http.root) == []


def test_an_upload_is_streamed_and_refused_past_the_limit_even_without_a_content_length(http):
    def body():  # chunked transfer: no Content-Length for Gate to refuse on
        yield b"--b\r\nContent-Disposition: form-data; name=purpose\r\n\r\nfine-tune\r\n"
        yield b'--b\r\nContent-Disposition: form-data; name=file; filename="a.zip"\r\n\r\n'
        for _ in range(400):
            yield b"x" * 1024

    r = http.client.post("/v1/files", content=body(), headers={"Content-Type": "multipart/form-data; boundary=b"})
    assert r.status_code == 413 and "files.max_bytes" in r.json()["error"]["message"]
    assert left_behind(http.root) == []
    json_body = http.client.post("/v1/files", json={"purpose": "fine-tune"})
    assert json_body.status_code == 415 and "multipart/form-data" in json_body.json()["error"]["message"]
    assert http.client.post("/v1/files", headers={"Authorization": ""}).status_code == 401


def test_the_official_openai_client_uploads_lists_retrieves_and_deletes(http, toy_dataset, tmp_path):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url="http://testserver/v1", api_key=KEY, http_client=http.client, max_retries=0)
    archive = tmp_path / "toy-sks.tar.gz"
    archive.write_bytes(tar_bytes(toy_dataset))
    with archive.open("rb") as f:
        file = client.files.create(file=f, purpose="fine-tune")
    assert file.status == "processed" and file.filename == "toy-sks.tar.gz" and file.model_extra["dataset"]
    assert [f.id for f in client.files.list()] == [file.id] and client.files.retrieve(file.id).id == file.id
    with pytest.raises(openai.BadRequestError) as info:
        client.files.create(file=("bad.zip", zip_bytes({"a.txt": b"x"})), purpose="fine-tune")
    assert info.value.body["problems"] and info.value.body["code"] == "invalid_dataset"
    assert client.files.delete(file.id).deleted is True
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(file.id)
    assert json.loads((http.root / info.value.body["file"]["id"] / "file.json").read_text())["tenant"] == "default"
