"""cluster.yaml passes Ray's own cluster-config validation and keeps services private."""
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_cluster_yaml_is_valid_for_ray_up():
    from ray.autoscaler._private.util import prepare_config, validate_config
    raw = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    validate_config(prepare_config(raw))
    assert raw["provider"]["type"] == "aws"
    assert raw["docker"]["image"].startswith("rayproject/ray:2.60.0-")
    head = " ".join(raw["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head
    assert "--env RAY_AUTH_MODE=token" in raw["docker"]["run_options"]      # token auth left on
    assert "/home/ray/.ray/auth_token" in raw["file_mounts"]
    assert any("pip install" in c and "/home/ray/raymtl" in c for c in raw["setup_commands"])


def test_cluster_onprem_yaml_is_valid_for_ray_up():
    """The on-premises example (Ray's `local` provider): cluster.yaml's image, token and setup."""
    from ray.autoscaler._private.util import prepare_config, validate_config
    raw = yaml.safe_load((ROOT / "cluster.onprem.yaml").read_text())
    validate_config(prepare_config(raw))
    cloud = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    assert raw["provider"]["type"] == "local"
    assert raw["provider"]["head_ip"] and raw["provider"]["worker_ips"]
    assert raw["docker"]["image"] == cloud["docker"]["image"]
    assert raw["docker"]["run_options"] == cloud["docker"]["run_options"]          # token auth left on
    assert raw["file_mounts"] == cloud["file_mounts"] and raw["setup_commands"] == cloud["setup_commands"]
    head = " ".join(raw["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "--num-cpus=0" in head          # no training on the head


def test_cluster_local_yaml_is_cluster_yamls_layout_for_ray_up():
    """The local twin (tests/test_ray_up.py launches it): valid, same node types, its provider loads."""
    from ray.autoscaler._private.providers import _get_node_provider_cls
    from ray.autoscaler._private.util import prepare_config, validate_config
    raw = yaml.safe_load((ROOT / "cluster.local.yaml").read_text())
    validate_config(prepare_config(raw))
    cloud = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    assert raw["available_node_types"].keys() == cloud["available_node_types"].keys()
    assert raw["head_node_type"] == cloud["head_node_type"]
    assert raw["available_node_types"]["head"]["resources"] == {"CPU": 0}
    assert not raw["available_node_types"]["gpu_worker"]["resources"].get("GPU")
    assert _get_node_provider_cls(raw["provider"]).__name__ == "LocalTwinProvider"
    head = " ".join(raw["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "RAY_AUTH_MODE=token" in head
    assert "ray stop" not in head                                   # it would stop every Ray on the machine
