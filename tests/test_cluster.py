"""cluster.yaml against Ray's own autoscaler schema, and a sweep joining a multi-node cluster with fake GPUs."""
from __future__ import annotations

import copy
import re
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from tune_cnn import cluster

from conftest import make_image_folder
from test_sweep import QUICK_TRIALS, run_cli, trial_results

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cluster_config() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def check(config: dict) -> None:
    """What `ray up` does to a config before launching anything: fill in defaults, then validate."""
    validate_config(prepare_config(copy.deepcopy(config)))


def test_cluster_yaml_passes_rays_validation(cluster_config: dict):
    check(cluster_config)
    nodes = cluster_config["available_node_types"]
    head, workers = nodes[cluster_config["head_node_type"]], [n for name, n in nodes.items() if name != cluster_config["head_node_type"]]
    assert not head["node_config"]["InstanceType"].startswith(("g", "p")) and head["resources"] == {"CPU": 0}  # a CPU head, no trials
    # A current DLAMI, not Ray's default (Ubuntu 18.04, Python 3.6), which the project cannot install on
    assert all(n["node_config"]["ImageId"].startswith("resolve:ssm:/aws/service/deeplearning/ami/") for n in nodes.values())
    assert [w["min_workers"] for w in workers] == [0] and workers[0]["max_workers"] >= 1
    assert workers[0]["node_config"]["InstanceType"] == "g5.2xlarge"  # one GPU per worker
    assert workers[0]["resources"] == {"CPU": 8, "GPU": 1}  # room for gpu: auto's eight trials of one CPU each
    assert any("nvidia-cuda-mps-control -d" in c for c in cluster_config["worker_start_ray_commands"])


def test_cluster_yaml_names_its_storage_once_and_holds_no_credentials():
    text = (ROOT / "cluster.yaml").read_text()
    assert text.count("s3://") == 1
    lowered = text.lower()
    assert not any(word in lowered for word in ("aws_access_key", "aws_secret", "secret_access_key", "password"))
    assert "--dashboard-host=0.0.0.0" not in text


@pytest.mark.parametrize(
    "typo",
    [
        lambda c: c["available_node_types"]["gpu_worker"].update(min_worker=0),  # misspelt key
        lambda c: c.update(head_node_type="heads"),  # names no node type
        lambda c: c.update(max_workers="eight"),  # wrong type
        lambda c: c["provider"].pop("type"),  # required key missing
    ],
)
def test_a_typo_in_cluster_yaml_fails_validation(cluster_config: dict, typo):
    broken = copy.deepcopy(cluster_config)
    typo(broken)
    with pytest.raises((jsonschema.ValidationError, ValueError, KeyError)):
        check(broken)


def test_gpu_requests_survive_a_cluster_whose_gpu_workers_have_not_started(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    bootstrap = tmp_path / "ray_bootstrap_config.yaml"
    bootstrap.write_text((ROOT / "cluster.yaml").read_text())  # what `ray up` leaves on the head node
    monkeypatch.setattr(cluster, "AUTOSCALER_CONFIG", bootstrap)
    assert cluster.scalable_gpus() == 8  # up to 8 GPU workers with one GPU each
    monkeypatch.setattr(cluster, "AUTOSCALER_CONFIG", tmp_path / "absent.yaml")
    assert cluster.scalable_gpus() == 0


JOINING = "; if nodes are still joining, start the sweep once they have"


@pytest.fixture
def fake_gpu_cluster():
    """A head without resources for trials, and two worker nodes with 2 CPUs and one (fake) GPU each."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    workers = [cluster.add_node(num_cpus=2, num_gpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    yield cluster, {w.node_id for w in workers}
    cluster.shutdown()


def test_a_trial_larger_than_every_node_is_one_line_not_a_hang(fake_gpu_cluster, tmp_path: Path):
    cluster, _ = fake_gpu_cluster
    images = make_image_folder(tmp_path / "images", per_class={"train": 40, "test": 10})
    for option, value, words in (("--cpus-per-trial", "3", "3 CPU(s) and the largest node of the Ray cluster has 2; lower --cpus-per-trial"),
                                 ("--gpus-per-trial", "2", "2 GPU(s) and the largest node of the Ray cluster has 1; lower --gpus-per-trial")):
        done = run_cli("quick", "--data", str(images), "--subset", "60", "--storage", str(tmp_path / "results"), "--address", cluster.address,
                       option, value)
        expected = f"error: a trial asks for {words} (or resources.{option[2:5]} in the space){JOINING}"
        assert done.returncode == 2 and done.stderr.splitlines() == [expected], done.stderr[-3000:]
    cluster.add_node(num_cpus=4)  # 3 CPUs fit this node and 1 GPU the others, but no node holds both
    cluster.wait_for_nodes()
    done = run_cli("quick", "--data", str(images), "--subset", "60", "--storage", str(tmp_path / "results"), "--address", cluster.address,
                   "--cpus-per-trial", "3", "--gpus-per-trial", "1")
    assert done.returncode == 2 and done.stderr.splitlines() == [
        f"error: a trial asks for 3 CPU(s) and 1 GPU(s) and no node of the Ray cluster has both; lower --cpus-per-trial or "
        f"--gpus-per-trial (or resources in the space){JOINING}"], done.stderr[-3000:]
    assert not (tmp_path / "results").exists()


def test_sweep_joins_a_multi_node_cluster_with_fractional_gpus(fake_gpu_cluster, tmp_path: Path):
    cluster, worker_ids = fake_gpu_cluster
    images = make_image_folder(tmp_path / "images", per_class={"train": 40, "test": 10})
    storage = tmp_path / "results"
    done = run_cli(
        "quick", "--data", str(images), "--subset", "60", "--storage", str(storage),
        "--address", cluster.address, "--gpus-per-trial", "0.5",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "no GPU" not in done.stdout
    results = trial_results(storage / "quick")
    assert len(results) == QUICK_TRIALS
    assert all([r["epoch"] for r in history] == [1, 2] for history in results.values())
    # Every trial ran on a GPU worker, none on the head. Not necessarily on both: Tune reuses a finished trial's
    # actor for the next, and these 60-image trials can all finish on one node's actors before the other's start.
    assert {history[-1]["node_id"] for history in results.values()} <= worker_ids
    # Each trial holds 1 CPU and half a GPU, so the GPUs in use are always half the CPUs in use.
    usage = [(float(c), float(g)) for c, g in re.findall(r"Logical resource usage: ([\d.]+)/4 CPUs, ([\d.]+)/2 GPUs", done.stdout)]
    assert usage and all(g == c / 2 for c, g in usage) and max(g for _, g in usage) > 0, usage
