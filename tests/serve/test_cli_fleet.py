"""`lorakit serve`'s fleet flags: --adapters s3://..., --adapter-cache, --allow-adapter-root, checked before
the model loads."""

from __future__ import annotations

import pytest

from lorakit.cli.common import UsageError
from lorakit.cli.serve import build_app, build_parser


@pytest.mark.parametrize("flags, words", [
    (["--adapter-cache", "/tmp/x"], "needs an s3:// --adapters"),
    (["--allow-adapter-root", "/no/such/dir"], "is not a directory"),
    (["--adapters", "s3:///prefix"], "names no bucket"),
    (["--adapters", "/no/such/dir"], "not a directory"),
])
def test_fleet_flags_are_checked(flags, words):
    with pytest.raises(UsageError, match=words):
        build_app(build_parser().parse_args(["--base", "tiny-llama-random", *flags]))


def test_s3_adapters_and_roots_reach_the_server(tmp_path, monkeypatch):
    from tests.serve.s3_servers import AWS_ENV

    for key, value in AWS_ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # never contacted: nothing is asked for
    args = build_parser().parse_args(["--base", "tiny-llama-random", "--adapters", "s3://bucket/team",
                                      "--adapter-cache", str(tmp_path / "cache"), "--allow-adapter-root",
                                      str(tmp_path)])
    _, server = build_app(args)
    (source,) = server.store.sources[1:]
    assert source.location.bucket == "bucket" and source.cache_dir == tmp_path / "cache"
    assert server.store.directory is None
    assert server.vllm.roots.roots == (str(tmp_path.resolve()),)
