"""Adapters from an S3-compatible store (lorakit.serve.object_store) against a real S3 server started here
(moto's server mode on 127.0.0.1), not a mock of boto3: fetched on first use, verified by size and checksum,
cached across instances; a missing bucket, a corrupt or truncated object and a store that goes away
mid-download each fail that adapter alone and leave nothing in the cache."""

from __future__ import annotations

import hashlib

import httpx
import pytest

from lorakit.serve.app import BackgroundServer, ServeConfig, create_app, make_server
from lorakit.serve.object_store import ObjectStoreError, S3Adapters, S3Location, s3_client, upload_adapter
from tests.serve.conftest import saved_adapters, tiny_chat_llama, with_adapters
from tests.serve.s3_servers import AWS_ENV, CuttingProxy, moto_s3

BUCKET = "adapters"


@pytest.fixture(scope="module")
def local_adapters(tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("s3src")
    saved_adapters(with_adapters(tiny_chat_llama(len(tokenizer)), ["pirate", "robot"]), ["pirate", "robot"], root)
    return root


@pytest.fixture()
def s3(monkeypatch, local_adapters):
    for key, value in AWS_ENV.items():
        monkeypatch.setenv(key, value)
    with moto_s3() as endpoint:
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
        client = s3_client()
        client.create_bucket(Bucket=BUCKET)
        for name in ("pirate", "robot"):
            upload_adapter(local_adapters / name, f"s3://{BUCKET}/team", name, client)
        yield client, endpoint


def cache_entries(cache):
    return sorted(p.name for p in cache.iterdir()) if cache.exists() else []


def test_location_parse():
    assert S3Location.parse("s3://b/p/q/") == S3Location("b", "p/q/")
    assert S3Location.parse("s3://b") == S3Location("b", "")
    for bad in ("s3://", "http://b/p", "b/p"):
        with pytest.raises(ValueError):
            S3Location.parse(bad)


def test_fetch_on_first_use_and_reuse_the_verified_cache(s3, tmp_path, local_adapters):
    client, _ = s3
    source = S3Adapters(f"s3://{BUCKET}/team", tmp_path / "cache", client)
    assert source.names() == ["pirate", "robot"]
    assert cache_entries(tmp_path / "cache") == []  # listing fetches nothing
    path = source.locate("pirate")
    assert cache_entries(tmp_path / "cache") == ["pirate"]
    for file in ("adapter_config.json", "adapter_model.safetensors"):
        assert (path / file).read_bytes() == (local_adapters / "pirate" / file).read_bytes()
    assert source.locate("nobody") is None
    stamp = (path / "adapter_model.safetensors").stat().st_ino
    again = S3Adapters(f"s3://{BUCKET}/team", tmp_path / "cache", client)  # a restart: checks, no download
    assert again.locate("pirate") == path
    assert (path / "adapter_model.safetensors").stat().st_ino == stamp
    with open(path / "adapter_model.safetensors", "r+b") as handle:  # a cache damaged on disk
        handle.seek(200)
        handle.write(b"\xff\xff\xff\xff")
    third = S3Adapters(f"s3://{BUCKET}/team", tmp_path / "cache", client)
    fixed = third.locate("pirate")
    assert (fixed / "adapter_model.safetensors").read_bytes() == (
        local_adapters / "pirate" / "adapter_model.safetensors").read_bytes()


def test_missing_bucket(s3, tmp_path):
    client, _ = s3
    source = S3Adapters("s3://no-such-bucket/team", tmp_path / "cache", client)
    assert source.names() == []
    with pytest.raises(ObjectStoreError, match="bucket does not exist"):
        source.locate("pirate")
    assert cache_entries(tmp_path / "cache") == []


@pytest.mark.parametrize("damage", ["corrupt", "truncated"])
def test_corrupt_or_truncated_object(s3, tmp_path, local_adapters, damage):
    client, _ = s3
    good = (local_adapters / "robot" / "adapter_model.safetensors").read_bytes()
    data = good[:len(good) // 2] if damage == "truncated" else good[:100] + bytes([good[100] ^ 1]) + good[101:]
    client.put_object(Bucket=BUCKET, Key="team/robot/adapter_model.safetensors", Body=data,
                      Metadata={"sha256": hashlib.sha256(good).hexdigest()})  # what the uploader meant
    source = S3Adapters(f"s3://{BUCKET}/team", tmp_path / "cache", client)
    with pytest.raises(ObjectStoreError, match="robot.*corrupt.*nothing was written"):
        source.locate("robot")
    assert cache_entries(tmp_path / "cache") == []  # no adapter, no temp directory
    assert source.locate("pirate").is_dir()  # the other adapter is fine


def test_config_without_weights(s3, tmp_path, local_adapters):
    client, _ = s3
    client.delete_object(Bucket=BUCKET, Key="team/robot/adapter_model.safetensors")
    with pytest.raises(ObjectStoreError, match="no adapter_model.safetensors"):
        S3Adapters(f"s3://{BUCKET}/team", tmp_path / "cache", client).locate("robot")


def test_store_goes_away_mid_download(s3, tmp_path, monkeypatch):
    _, endpoint = s3
    proxy = CuttingProxy(endpoint)
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        source = S3Adapters(f"s3://{BUCKET}/team", tmp_path / "cache")
        with pytest.raises(ObjectStoreError, match="pirate.*download .* failed.*nothing was written"):
            source.locate("pirate")
        assert proxy.cuts >= 1
        assert cache_entries(tmp_path / "cache") == []
    finally:
        proxy.close()


def test_store_unreachable(s3, tmp_path, monkeypatch):
    import socket

    with socket.socket() as probe:  # a free port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    source = S3Adapters(f"s3://{BUCKET}/team", tmp_path / "cache")
    with pytest.raises(ObjectStoreError, match="cannot list"):
        source.locate("pirate")
    assert cache_entries(tmp_path / "cache") == []


def test_served_from_the_store(s3, tmp_path, tokenizer):
    """A server over the bucket serves an adapter on first request by name; a corrupt one fails alone."""
    client, _ = s3
    client.put_object(Bucket=BUCKET, Key="team/robot/adapter_model.safetensors", Body=b"garbage",
                      Metadata={"sha256": "0" * 64})
    source = S3Adapters(f"s3://{BUCKET}/team", tmp_path / "cache", client)
    server = make_server(tiny_chat_llama(len(tokenizer)), tokenizer, None, max_batch=2, sources=(source,),
                         config=ServeConfig(base_name="tiny", max_tokens_limit=4))
    with BackgroundServer(create_app(server)) as url, httpx.Client(base_url=url, timeout=60) as http:
        ids = [m["id"] for m in http.get("/v1/models").json()["data"]]
        assert ids == ["tiny", "pirate", "robot"]
        done = http.post("/v1/completions", json={"model": "pirate", "prompt": "hi", "max_tokens": 2})
        assert done.status_code == 200, done.text
        assert "pirate" in server.store.resident()
        bad = http.post("/v1/completions", json={"model": "robot", "prompt": "hi", "max_tokens": 2})
        assert bad.status_code == 500 and bad.json()["error"]["code"] == "adapter_load_failed"
        assert "robot" in bad.json()["error"]["message"] and "corrupt" in bad.json()["error"]["message"]
        assert str(tmp_path) not in bad.text
        again = http.post("/v1/completions", json={"model": "pirate", "prompt": "hi", "max_tokens": 2})
        assert again.status_code == 200
    assert cache_entries(tmp_path / "cache") == ["pirate"]
