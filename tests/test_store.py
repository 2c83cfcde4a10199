"""Behaviour of both stores: S3Store on a moto S3 server and LocalStore in a folder.

Tests that take the `store` fixture run once per store. Tests of what only one
store promises (content types, Cache-Control, key checks of the local store)
take that store alone.
"""

import asyncio
import hashlib
import os
import socket
import uuid
from datetime import timedelta
from pathlib import Path

import pytest

from proxy.errors import StoreFailed
from proxy.store import LocalStore, S3Store, Store
from proxy.store import local as local_module

BODY = b"\xff\xd8\xff\xe0 not really a JPEG, but bytes are bytes \x00\x01"
CACHE_CONTROL = "public, max-age=31536000, immutable"

# Keys that need escaping in a URL or that are not ASCII.
AWKWARD_KEYS = [
    "original/trips/Été 01.jpg",
    "original/ü.jpg",
    "original/a+b.jpg",
    "original/100%.jpg",
    "original/%2e%2e.jpg",
    "original/time 12:30.jpg",
    "original/with space/inner folder/p q.jpg",
]


def closed_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago, so connections are refused."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def quoted_md5(body: bytes) -> str:
    return '"' + hashlib.md5(body).hexdigest() + '"'


@pytest.fixture
def local_store(tmp_path: Path) -> LocalStore:
    root = tmp_path / "store"
    root.mkdir()
    return LocalStore(root)


@pytest.fixture(params=["s3", "local"])
def store(request: pytest.FixtureRequest) -> Store:
    """Each store in turn: S3Store on its own moto bucket, LocalStore in tmp_path."""
    if request.param == "s3":
        return request.getfixturevalue("s3_store")
    return request.getfixturevalue("local_store")


async def put(store: Store, key: str, body: bytes = BODY, content_type: str = "image/jpeg"):
    return await store.put(key, body, content_type, CACHE_CONTROL)


# Put, get and head


async def test_put_then_get_returns_body(store: Store):
    await put(store, "original/a/photo.jpg")

    stored = await store.get("original/a/photo.jpg")

    assert stored is not None
    assert stored.key == "original/a/photo.jpg"
    assert stored.body == BODY


async def test_etag_is_quoted_md5(store: Store):
    written = await put(store, "original/photo.jpg")
    stored = await store.get("original/photo.jpg")

    assert written.etag == quoted_md5(BODY)
    assert stored.etag == quoted_md5(BODY)


async def test_get_without_etag_returns_body(store: Store):
    await put(store, "original/photo.jpg")

    stored = await store.get("original/photo.jpg", need_etag=False)

    assert stored.body == BODY
    # S3 returns its ETag anyway; the local store skips the MD5.
    assert stored.etag in ("", quoted_md5(BODY))


async def test_local_get_without_etag_skips_md5(local_store: LocalStore, monkeypatch):
    await put(local_store, "original/photo.jpg")
    hashed = []
    monkeypatch.setattr(local_module, "md5_etag", lambda body: hashed.append(len(body)) or quoted_md5(body))

    skipped = await local_store.get("original/photo.jpg", need_etag=False)
    hashed_without = len(hashed)
    full = await local_store.get("original/photo.jpg")

    assert skipped.etag == ""
    assert hashed_without == 0
    assert full.etag == quoted_md5(BODY)
    assert hashed == [len(BODY)]


async def test_put_result_matches_get(store: Store):
    written = await put(store, "r/photo-720.webp", content_type="image/webp")
    stored = await store.get("r/photo-720.webp")

    assert written.key == stored.key
    assert written.body == stored.body
    assert written.content_type == stored.content_type
    assert written.etag == stored.etag


async def test_last_modified_is_utc(store: Store):
    written = await put(store, "original/photo.jpg")
    stored = await store.get("original/photo.jpg")
    info = await store.head("original/photo.jpg")

    assert written.last_modified.utcoffset() == timedelta(0)
    assert stored.last_modified.utcoffset() == timedelta(0)
    assert info.last_modified == stored.last_modified


async def test_get_missing_key_returns_none(store: Store):
    assert await store.get("original/missing.jpg") is None


async def test_head_missing_key_returns_none(store: Store):
    assert await store.head("original/missing.jpg") is None


async def test_get_folder_key_returns_none(store: Store):
    await put(store, "original/folder/photo.jpg")

    assert await store.get("original/folder") is None
    assert await store.head("original/folder") is None


async def test_head_matches_get(store: Store):
    await put(store, "original/photo.jpg")

    info = await store.head("original/photo.jpg")
    stored = await store.get("original/photo.jpg")

    assert info is not None
    assert info.key == "original/photo.jpg"
    assert info.size == len(BODY)
    assert info.etag == stored.etag


async def test_put_overwrites_object(store: Store):
    await put(store, "r/photo-720.jpg", b"first version")
    second = await put(store, "r/photo-720.jpg", b"second, longer version")

    stored = await store.get("r/photo-720.jpg")
    info = await store.head("r/photo-720.jpg")

    assert stored.body == b"second, longer version"
    assert stored.etag == second.etag
    assert stored.etag == quoted_md5(b"second, longer version")
    assert info.size == len(b"second, longer version")


async def test_put_empty_body_round_trips(store: Store):
    await put(store, "original/empty.jpg", b"")

    stored = await store.get("original/empty.jpg")

    assert stored.body == b""
    assert stored.etag == quoted_md5(b"")


# Listing


async def put_all(store: Store, keys: list[str]) -> None:
    await asyncio.gather(*(put(store, key, key.encode()) for key in keys))


async def test_list_keys_nested_prefix_sorted(store: Store):
    await put_all(store, [
        "original/a/b/c/deep.jpg",
        "original/a/b/photo.jpg",
        "original/a/top.jpg",
        "original/z.jpg",
        "r/a/b/photo-720.jpg",
    ])

    assert await store.list_keys("original/a/") == [
        "original/a/b/c/deep.jpg",
        "original/a/b/photo.jpg",
        "original/a/top.jpg",
    ]


async def test_list_keys_stem_prefix_matches_extensions(store: Store):
    await put_all(store, [
        "original/a/stem.jpg",
        "original/a/stem.JPG",
        "original/a/stem2.jpg",
        "original/a/stem-720.jpg",
        "original/a/stem/inside.jpg",
    ])

    # Code point order puts upper case first, as S3 orders keys by UTF-8 bytes.
    assert await store.list_keys("original/a/stem.") == ["original/a/stem.JPG", "original/a/stem.jpg"]


async def test_list_keys_prefix_crosses_folder_names(store: Store):
    await put_all(store, ["original/ab/x.jpg", "original/a/y.jpg", "original/abc.jpg", "original/b/z.jpg"])

    assert await store.list_keys("original/a") == ["original/a/y.jpg", "original/ab/x.jpg", "original/abc.jpg"]


async def test_list_keys_empty_prefix_lists_all(store: Store):
    await put_all(store, ["r/x-720.jpg", "original/x.jpg", "top.jpg"])

    assert await store.list_keys("") == ["original/x.jpg", "r/x-720.jpg", "top.jpg"]


async def test_list_keys_unmatched_prefix_is_empty(store: Store):
    await put(store, "original/photo.jpg")

    assert await store.list_keys("original/missing/") == []
    assert await store.list_keys("original/photo.png") == []


async def test_list_keys_pages_past_1000(store: Store):
    # S3 returns at most 1000 keys per ListObjectsV2 call, so 1003 keys take two pages.
    keys = [f"original/many/{index:04d}.jpg" for index in range(1003)]
    for start in range(0, len(keys), 100):
        await put_all(store, keys[start : start + 100])

    listed = await store.list_keys("original/many/")

    assert len(listed) == 1003
    assert listed == keys


# Delete


async def test_delete_removes_object(store: Store):
    await put(store, "r/photo-720.jpg")

    await store.delete("r/photo-720.jpg")

    assert await store.get("r/photo-720.jpg") is None
    assert await store.head("r/photo-720.jpg") is None
    assert await store.list_keys("r/") == []


async def test_delete_missing_key_succeeds(store: Store):
    await store.delete("r/never-written-720.jpg")

    assert await store.get("r/never-written-720.jpg") is None


async def test_delete_keeps_other_keys(store: Store):
    await put_all(store, ["r/a-360.jpg", "r/a-720.jpg"])

    await store.delete("r/a-360.jpg")

    assert await store.list_keys("r/") == ["r/a-720.jpg"]


# Awkward keys


@pytest.mark.parametrize("key", AWKWARD_KEYS)
async def test_awkward_key_round_trips(store: Store, key: str):
    await put(store, key, key.encode())

    stored = await store.get(key)
    info = await store.head(key)

    assert stored is not None
    assert stored.body == key.encode()
    assert info is not None
    assert info.size == len(key.encode())
    assert await store.list_keys(key) == [key]


@pytest.mark.parametrize("key", AWKWARD_KEYS)
async def test_awkward_key_deletes(store: Store, key: str):
    await put(store, key)

    await store.delete(key)

    assert await store.get(key) is None


async def test_awkward_keys_stay_distinct(store: Store):
    # `%2e%2e` and `a+b` must stay literal, not be decoded into `..` or `a b`.
    await put_all(store, ["original/a+b.jpg", "original/a b.jpg", "original/%2e%2e.jpg"])

    assert (await store.get("original/a+b.jpg")).body == b"original/a+b.jpg"
    assert (await store.get("original/a b.jpg")).body == b"original/a b.jpg"
    assert await store.list_keys("original/") == ["original/%2e%2e.jpg", "original/a b.jpg", "original/a+b.jpg"]


# check()


async def test_check_succeeds(store: Store):
    await store.check()


async def test_description_names_location(store: Store, tmp_path: Path):
    if isinstance(store, S3Store):
        assert store.description == f"s3://{store.bucket}"
    else:
        assert store.description == str((tmp_path / "store").resolve())


# S3 only


async def test_s3_put_sets_cache_control(s3_store: S3Store, s3, bucket: str):
    await put(s3_store, "r/photo-720.jpg")

    head = s3.head_object(Bucket=bucket, Key="r/photo-720.jpg")

    assert head["CacheControl"] == CACHE_CONTROL
    assert head["ContentType"] == "image/jpeg"


async def test_s3_get_keeps_given_content_type(s3_store: S3Store):
    # S3 keeps the Content-Type it was given, whatever the extension is.
    written = await put(s3_store, "r/photo-720.jpg", content_type="image/webp")
    stored = await s3_store.get("r/photo-720.jpg")

    assert written.content_type == "image/webp"
    assert stored.content_type == "image/webp"


async def test_s3_reads_objects_written_by_boto3(s3_store: S3Store, s3, bucket: str):
    s3.put_object(Bucket=bucket, Key="original/Été 01.jpg", Body=BODY, ContentType="image/jpeg")

    stored = await s3_store.get("original/Été 01.jpg")

    assert stored.body == BODY
    assert stored.content_type == "image/jpeg"
    assert await s3_store.list_keys("original/") == ["original/Été 01.jpg"]


async def test_s3_writes_exact_key(s3_store: S3Store, s3, bucket: str):
    await put(s3_store, "original/a+b 100%.jpg")

    listed = s3.list_objects_v2(Bucket=bucket)["Contents"]

    assert [item["Key"] for item in listed] == ["original/a+b 100%.jpg"]


async def test_s3_missing_bucket_check_fails(aws_env: str):
    store = await S3Store.open(
        f"missing-{uuid.uuid4().hex[:12]}", connect_timeout=5, read_timeout=5, max_attempts=1
    )
    try:
        with pytest.raises(StoreFailed):
            await store.check()
        with pytest.raises(StoreFailed):
            await store.get("original/photo.jpg")
    finally:
        await store.close()


async def test_s3_closed_port_raises_store_failed(aws_env: str, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{closed_port()}")
    store = await S3Store.open("test-bucket", connect_timeout=5, read_timeout=5, max_attempts=1)
    try:
        with pytest.raises(StoreFailed):
            await store.get("original/photo.jpg")
        with pytest.raises(StoreFailed):
            await store.check()
    finally:
        await store.close()


# LocalStore only


@pytest.mark.parametrize(
    ("key", "content_type"),
    [
        ("original/photo.jpg", "image/jpeg"),
        ("original/photo.JPG", "image/jpeg"),
        ("original/photo.jpeg", "image/jpeg"),
        ("r/photo-720.png", "image/png"),
        ("r/photo-720.webp", "image/webp"),
        ("r/photo-720.avif", "image/avif"),
        ("original/photo.heic", "image/heic"),
        ("original/noextension", "application/octet-stream"),
        ("data:photo.jpg", "image/jpeg"),
    ],
)
async def test_local_content_type_follows_extension(local_store: LocalStore, key: str, content_type: str):
    # The local store keeps no metadata, so the type given to put is not kept.
    written = await put(local_store, key, content_type="application/x-given")
    stored = await local_store.get(key)

    assert stored.content_type == content_type
    assert written.content_type == content_type


async def test_local_writes_file_below_root(local_store: LocalStore):
    await put(local_store, "original/trips/Été 01.jpg")

    path = local_store.root / "original" / "trips" / "Été 01.jpg"

    assert path.read_bytes() == BODY


@pytest.mark.parametrize(
    "key",
    [
        "",
        "/etc/passwd",
        "../escape.jpg",
        "original/../../escape.jpg",
        "original/..",
        "original//photo.jpg",
        "original/./photo.jpg",
        "original/",
        "original/photo\x00.jpg",
    ],
)
async def test_local_rejects_unsafe_key(local_store: LocalStore, key: str):
    with pytest.raises(StoreFailed):
        await put(local_store, key)
    with pytest.raises(StoreFailed):
        await local_store.get(key)
    with pytest.raises(StoreFailed):
        await local_store.head(key)
    with pytest.raises(StoreFailed):
        await local_store.delete(key)


async def test_local_never_writes_outside_root(local_store: LocalStore, tmp_path: Path):
    for key in ("../escape.jpg", "original/../../escape.jpg", "../store-sibling/escape.jpg"):
        with pytest.raises(StoreFailed):
            await put(local_store, key)

    assert sorted(os.listdir(tmp_path)) == ["store"]
    assert os.listdir(local_store.root) == []


async def test_local_list_never_leaves_root(local_store: LocalStore, tmp_path: Path):
    (tmp_path / "outside.jpg").write_bytes(BODY)
    (tmp_path / "sibling").mkdir()
    (tmp_path / "sibling" / "photo.jpg").write_bytes(BODY)

    assert await local_store.list_keys("../") == []
    assert await local_store.list_keys("../sibling/") == []
    assert await local_store.list_keys("original/../../") == []
    assert await local_store.list_keys("original/\x00/") == []


async def test_local_list_ignores_temporary_files(local_store: LocalStore):
    await put(local_store, "original/a/photo.jpg")
    (local_store.root / "original" / "a" / ".tmp-abc123").write_bytes(b"partial")
    (local_store.root / ".tmp-def456").write_bytes(b"partial")

    assert await local_store.list_keys("original/") == ["original/a/photo.jpg"]
    assert await local_store.list_keys("original/a/.tmp") == []
    assert await local_store.list_keys("") == ["original/a/photo.jpg"]


async def test_local_put_leaves_no_temporary_file(local_store: LocalStore):
    await put(local_store, "r/photo-720.jpg", b"first")
    await put(local_store, "r/photo-720.jpg", b"second")

    assert os.listdir(local_store.root / "r") == ["photo-720.jpg"]


async def test_local_failed_put_removes_temporary_file(local_store: LocalStore):
    # A folder where the file should go makes the final rename fail.
    (local_store.root / "r" / "photo-720.jpg").mkdir(parents=True)

    with pytest.raises(StoreFailed):
        await put(local_store, "r/photo-720.jpg")

    assert os.listdir(local_store.root / "r") == ["photo-720.jpg"]


async def test_local_put_under_file_fails(local_store: LocalStore):
    await put(local_store, "original/photo.jpg")

    with pytest.raises(StoreFailed):
        await put(local_store, "original/photo.jpg/inner.jpg")


async def test_local_check_missing_root_fails(tmp_path: Path):
    store = LocalStore(tmp_path / "missing")

    with pytest.raises(StoreFailed):
        await store.check()


async def test_local_file_mode_follows_umask(local_store: LocalStore):
    await put(local_store, "r/photo-720.jpg")
    plain = local_store.root / "plain"
    plain.write_bytes(b"")

    mode = (local_store.root / "r" / "photo-720.jpg").stat().st_mode & 0o777

    assert mode == plain.stat().st_mode & 0o777


async def test_local_head_after_get_skips_md5(local_store: LocalStore, monkeypatch):
    await local_store.put("original/p.jpg", b"photo", "image/jpeg", "public")
    stored = await local_store.get("original/p.jpg")
    hashed = []
    monkeypatch.setattr(local_module, "md5_etag", lambda body: hashed.append(body) or "unexpected")

    info = await local_store.head("original/p.jpg")

    assert info is not None
    assert info.etag == stored.etag
    assert info.size == len(b"photo")
    assert hashed == []


async def test_local_head_sees_replaced_file(local_store: LocalStore):
    await local_store.put("original/p.jpg", b"first", "image/jpeg", "public")
    before = await local_store.head("original/p.jpg")
    # Replaced outside the store, by a file of the same size.
    replacement = local_store.root / "original" / "next.tmp"
    replacement.write_bytes(b"other")
    os.replace(replacement, local_store.root / "original" / "p.jpg")

    after = await local_store.head("original/p.jpg")

    assert after is not None
    assert after.etag != before.etag
    assert after.etag == f'"{hashlib.md5(b"other").hexdigest()}"'


async def test_local_head_after_delete_returns_none(local_store: LocalStore):
    await local_store.put("original/p.jpg", b"photo", "image/jpeg", "public")
    await local_store.head("original/p.jpg")

    await local_store.delete("original/p.jpg")

    assert await local_store.head("original/p.jpg") is None
