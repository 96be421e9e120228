"""``--executor ray`` on a local Ray cluster started by the test: the local executor's bytes (issue 16)."""

from __future__ import annotations

import pytest

ray = pytest.importorskip("ray")

import loralego  # noqa: E402
from loralego.pipeline import merge_to_folder  # noqa: E402


@pytest.fixture(scope="module")
def local_cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _files(folder):
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


@pytest.mark.parametrize("method", ["lego+", "svd", "cat"])
def test_ray_tasks_give_the_local_executors_bytes(local_cluster, mixed_adapters, tmp_path, method):
    adapters = [loralego.load(path) for path in mixed_adapters]
    options = {"method": method} if method == "cat" else {"method": method, "rank": 4}
    merge_to_folder(adapters, tmp_path / "local", command="test", **options)
    merge_to_folder(adapters, tmp_path / "ray", command="test", executor="ray", **options)
    local, remote = _files(tmp_path / "local"), _files(tmp_path / "ray")
    assert local.keys() == remote.keys() and "adapter_model.safetensors" in local
    assert local == remote  # tensors, header, config and model card


def test_a_task_error_comes_back_as_one_line(local_cluster, mixed_adapters, tmp_path):
    adapters = [loralego.load(path) for path in mixed_adapters]
    with pytest.raises(loralego.LoraLegoError, match="too large to merge"):
        merge_to_folder(adapters, tmp_path / "out", command="test", executor="ray", method="cat", weights=[1e30] * 3)
    assert not (tmp_path / "out").exists()
