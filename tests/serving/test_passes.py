"""The pass queue without Ray: batches handed over while a pass runs are merged into the next pass."""

from __future__ import annotations

import asyncio

from serving.passes import PassQueue


def test_batches_formed_during_a_pass_join_the_next_one():
    passes: list[list[str]] = []

    async def run(items: list[str]) -> list[str]:
        passes.append(items)
        await asyncio.sleep(0.05)
        return [i.upper() for i in items]

    async def main():
        queue = PassQueue(run, size=lambda item: 2 if item.startswith("n2") else 1, max_images=4)
        first = asyncio.create_task(queue.submit(["a"]))
        await asyncio.sleep(0.01)  # "a" is running; three small batches arrive meanwhile
        rest = [asyncio.create_task(queue.submit(b)) for b in (["b"], ["c", "n2d"], ["e"])]
        return await first, [await r for r in rest]

    first, rest = asyncio.run(main())
    assert first == ["A"] and rest == [["B"], ["C", "N2D"], ["E"]]
    assert passes == [["a"], ["b", "c", "n2d"], ["e"]]  # 1 + 1 + 2 images fill the second pass


def test_skipped_items_do_not_run_and_a_failed_pass_fails_only_its_members():
    gone = {"b"}
    passes: list[list[str]] = []

    async def run(items: list[str]) -> list[str]:
        passes.append(items)
        if "boom" in items:
            raise RuntimeError("pass failed")
        await asyncio.sleep(0.02)
        return items

    async def main():
        queue = PassQueue(run, size=lambda item: 1, max_images=2, skip=lambda i: i in gone, skipped=lambda i: "left")
        first = asyncio.create_task(queue.submit(["boom"]))
        await asyncio.sleep(0)
        second = asyncio.create_task(queue.submit(["a", "b", "c"]))
        return await first, await second

    first, second = asyncio.run(main())
    assert isinstance(first[0], RuntimeError) and second == ["a", "left", "c"]
    assert passes == [["boom"], ["a", "c"]]
