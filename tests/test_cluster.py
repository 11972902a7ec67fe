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
