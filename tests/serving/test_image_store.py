"""The store behind ``response_format: "url"``: time-to-live, eviction by count and bytes (oldest first), ids,
and the config check that one request's images always fit. A fake clock stands in for sleeping."""

from __future__ import annotations

import pytest

from serving.image_store import IMAGE_ID, ImageStore, ImageStoreFull


class Clock:
    def __init__(self):
        self.now = 50.0

    def __call__(self) -> float:
        return self.now


def store(clock: Clock, **bounds) -> ImageStore:
    return ImageStore(**({"ttl_s": 10.0, "max_images": 4, "max_bytes": 100} | bounds), clock=clock, wall=lambda: 1e9)


def test_an_image_lives_ttl_s_then_reads_as_none():
    clock = Clock()
    s = store(clock)
    [kept] = s.put([b"png-bytes"])
    assert kept.expires_at == 1e9 + 10.0
    clock.now += 9.999
    assert s.get(kept.id) == b"png-bytes"
    clock.now += 0.001
    assert s.get(kept.id) is None
    assert s.stats() == {"images": 0, "bytes": 0, "evicted": 0}  # expired is not evicted


def test_beyond_max_images_the_oldest_go_first_and_a_request_is_kept_whole():
    clock = Clock()
    s = store(clock)
    first = s.put([b"a", b"b"])
    clock.now += 1
    second = s.put([b"c", b"d"])
    third = s.put([b"e", b"f", b"g"])  # needs 3 places: a, b and c go (oldest first)
    assert [s.get(i.id) for i in first + second + third] == [None, None, None, b"d", b"e", b"f", b"g"]
    assert s.stats() == {"images": 4, "bytes": 4, "evicted": 3}


def test_beyond_max_bytes_the_oldest_go_first():
    clock = Clock()
    s = store(clock, max_bytes=100)
    old = s.put([b"x" * 60])
    new = s.put([b"y" * 30])
    newest = s.put([b"z" * 50])  # 60 + 30 + 50 > 100: the 60 goes, 30 + 50 stay
    assert [s.get(i.id) for i in old + new + newest] == [None, b"y" * 30, b"z" * 50]
    assert s.stats()["bytes"] == 80


def test_a_request_larger_than_the_store_is_refused_and_evicts_nothing():
    clock = Clock()
    s = store(clock, max_bytes=100, max_images=2)
    [kept] = s.put([b"k" * 10])
    with pytest.raises(ImageStoreFull, match="max_bytes 100.*b64_json"):
        s.put([b"x" * 101])
    with pytest.raises(ImageStoreFull, match="max_images 2"):
        s.put([b"1", b"2", b"3"])
    assert s.get(kept.id) == b"k" * 10 and s.stats()["evicted"] == 0


def test_ids_are_unguessable_distinct_and_match_the_route_pattern():
    s = store(Clock(), max_images=1000, max_bytes=10**6)
    ids = [i.id for _ in range(200) for i in s.put([b"p"])]
    assert len(set(ids)) == 200 and all(IMAGE_ID.match(i) and len(i) == 32 for i in ids)
    assert s.get("not-an-id") is None


def test_bounds_must_be_positive():
    with pytest.raises(ValueError, match="positive"):
        ImageStore(ttl_s=0, max_images=1, max_bytes=1)


def test_the_config_refuses_a_store_too_small_for_one_request():
    from serving.config import ServeArgs

    with pytest.raises(ValueError, match=r"image_urls .*cannot hold one request's images"):
        ServeArgs(champion={"model": None}, default_model="base", limits={"max_n": 4}, image_urls={"max_images": 2})
    with pytest.raises(ValueError, match=r"image_urls .*raise them"):
        ServeArgs(
            champion={"model": None},
            default_model="base",
            limits={"max_size": 2048, "max_n": 4},
            batching={"max_batch_size": 8},
            image_urls={"max_bytes": 2**20},
        )
    assert ServeArgs(champion={"model": None}, default_model="base").image_urls.ttl_s == 3600
