"""Client memory of a folder upload: the SDK's streamed tar (``Client.upload`` / ``AsyncClient.upload``) against
packing the folder into an in-memory tar first and posting it with httpx (what a script without the SDK does).

    python benchmarks/upload_memory.py                    # 128 MiB, 3 rounds -> runs/benchmarks/upload_memory.json
    python benchmarks/upload_memory.py --files 8 --mib 1  # quicker

The folder holds ``--files`` files of ``--mib`` MiB of random bytes (incompressible, like PNG/JPEG). Each arm sends
it to a transport that reads the request body piece by piece and drops each piece (no server: only the client's
memory is measured), under ``tracemalloc`` (peak of Python allocations while the call runs). Every arm runs the same
``--rounds``; the medians are printed with the ratio to the streamed upload.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import statistics
import tarfile
import tempfile
import time
import tracemalloc
from pathlib import Path

import httpx

from serving.client import AsyncClient, Client

REPO = Path(__file__).resolve().parents[1]
ANSWER = {
    "id": "file-0",
    "bytes": 0,
    "created_at": 0,
    "filename": "x.tar",
    "purpose": "fine-tune",
    "status": "processed",
}


class Drain(httpx.BaseTransport, httpx.AsyncBaseTransport):
    """Reads each request body as it is produced and keeps only its size."""

    def __init__(self):
        self.sent = 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.sent = sum(len(piece) for piece in request.stream)
        return httpx.Response(200, json=ANSWER)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.sent = 0
        async for piece in request.stream:
            self.sent += len(piece)
        return httpx.Response(200, json=ANSWER)


def sdk(folder: Path, drain: Drain) -> None:
    Client("http://x", transport=drain).upload(folder)


def sdk_async(folder: Path, drain: Drain) -> None:
    async def main():
        async with AsyncClient("http://x", transport=drain) as client:
            await client.upload(folder)

    asyncio.run(main())


def in_memory(folder: Path, drain: Drain) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.add(folder, arcname=folder.name)
    files = {"file": (f"{folder.name}.tar", buf.getvalue())}
    httpx.Client(transport=drain).post("http://x/v1/files", data={"purpose": "fine-tune"}, files=files)


def measure(arm, folder: Path) -> dict:
    drain = Drain()
    tracemalloc.start()
    start = time.perf_counter()
    try:
        arm(folder, drain)
        seconds, peak = time.perf_counter() - start, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return {"peak_mib": peak / 2**20, "seconds": seconds, "sent_mib": drain.sent / 2**20}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--files", type=int, default=64, help="files in the folder")
    p.add_argument("--mib", type=float, default=2.0, help="MiB per file")
    p.add_argument("--rounds", type=int, default=3, help="rounds per arm (medians)")
    p.add_argument("--out", default=str(REPO / "runs" / "benchmarks" / "upload_memory.json"))
    args = p.parse_args(argv)
    arms = {"sdk_streamed": sdk, "sdk_async_streamed": sdk_async, "in_memory_tar": in_memory}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "dataset"
        folder.mkdir()
        for i in range(args.files):
            (folder / f"{i:04d}.png").write_bytes(os.urandom(int(args.mib * 2**20)))
        rounds = {name: [] for name in arms}
        for _ in range(args.rounds):  # interleaved: each round runs every arm once
            for name, arm in arms.items():
                rounds[name].append(measure(arm, folder))
    out = {"folder_mib": args.files * args.mib, "files": args.files, "rounds": args.rounds, "arms": {}}
    base = statistics.median(r["peak_mib"] for r in rounds["sdk_streamed"])
    for name, rs in rounds.items():
        med = {k: statistics.median(r[k] for r in rs) for k in ("peak_mib", "seconds", "sent_mib")}
        out["arms"][name] = med | {"peak_ratio_to_sdk": med["peak_mib"] / base}
        print(f"{name:20s} peak {med['peak_mib']:8.1f} MiB  ({med['peak_mib'] / base:6.1f}x sdk)  "
              f"{med['seconds']:6.2f} s  sent {med['sent_mib']:.1f} MiB")  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
