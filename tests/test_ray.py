"""The Ray executor: the same stage on a local Ray instance gives the manifest the local processes give."""
from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from tests.conftest import vidu

pytest.importorskip("ray")


def _rows(path: str) -> list[dict]:
    return pq.read_table(path.strip()).to_pylist()


def test_stages_on_local_ray_equal_local_processes(gen_media, tmp_path):
    """prefilter (7 files, six rejected for their faults) and clip (one video, three shots) on a local Ray
    instance write exactly the rows two local worker processes write. The local and the Ray run of a
    stage run at the same time (separate workspaces; most of each is start-up: imports, Ray's)."""
    from concurrent.futures import ThreadPoolExecutor

    src, opts = str(gen_media["dir"]), ("--min-short-side", "100", "--quiet", "--workers", "2")
    ray = ("--executor", "ray")
    with ThreadPoolExecutor(2) as pool:
        local = pool.submit(vidu, "prefilter", src, "--workdir", str(tmp_path / "a"), *opts)
        on_ray = pool.submit(vidu, "prefilter", src, "--workdir", str(tmp_path / "b"), *opts, *ray, timeout=900)
        videos_local, videos_ray = local.result().stdout, on_ray.result().stdout
        a, b = _rows(videos_local), _rows(videos_ray)
        assert len(a) == 7 and sum(r["status"] == "ok" for r in a) == 1
        assert a == b
        local = pool.submit(vidu, "clip", "--workdir", str(tmp_path / "a"), "--quiet", "--workers", "2",
                            input=videos_local)
        on_ray = pool.submit(vidu, "clip", "--workdir", str(tmp_path / "b"), "--quiet", "--workers", "2", *ray,
                             input=videos_ray, timeout=900)
        clips_local, clips_ray = local.result().stdout, on_ray.result().stdout
    a, b = _rows(clips_local), _rows(clips_ray)
    assert [r["status"] for r in a] == ["ok", "ok", "ok"]
    assert a == b


def test_unreachable_ray_cluster_is_a_one_line_error(gen_media, tmp_path):
    videos = vidu("prefilter", str(gen_media["dir"]), "--workdir", str(tmp_path), "--min-short-side", "100",
                  "--quiet").stdout
    proc = vidu("clip", "--workdir", str(tmp_path), "--quiet", "--executor", "ray", "--ray-address",
                "127.0.0.1:1", input=videos, check=False, timeout=300)
    assert proc.returncode == 2
    assert "cannot connect to Ray at 127.0.0.1:1" in proc.stderr
    assert "Traceback" not in proc.stderr
