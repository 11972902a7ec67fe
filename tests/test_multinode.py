"""Multi-node placement on simulated nodes (``ray.cluster_utils.Cluster``): a 2-worker run
with STRICT_SPREAD puts its workers on different nodes and trains to the same result as
the same run packed onto one node (STRICT_PACK).

Starts its own multi-node Ray, so it must not share the machine with the session's
in-process Ray: conftest orders it before every test that starts that one.
"""
import pytest

from raymtl.config import smoke
from raymtl.train.trainer import fit

pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def cluster():
    # a head that runs nothing, and two 2-CPU nodes
    import socket

    import ray
    from ray.cluster_utils import Cluster

    from raymtl.data.streams import configure_ray_data
    with socket.socket() as sock:          # 8265 may be held by another Ray on this machine
        sock.bind(("127.0.0.1", 0))
        dashboard_port = sock.getsockname()[1]
    c = Cluster(initialize_head=True, connect=True,
                head_node_args={"num_cpus": 0, "include_dashboard": True, "dashboard_host": "127.0.0.1",
                                "dashboard_port": dashboard_port})
    nodes = [c.add_node(num_cpus=2) for _ in range(2)]
    c.wait_for_nodes()
    configure_ray_data()
    yield c, nodes
    ray.shutdown()
    c.shutdown()


def train_workers() -> dict[str, str]:
    """actor id -> node id of every Ray Train worker this cluster has run (State API)."""
    import ray
    from ray.util.state import list_actors
    return {a.actor_id: a.node_id
            for a in list_actors(address=ray.get_runtime_context().gcs_address,
                                 filters=[("class_name", "=", "RayTrainWorker")], limit=1000)}


def fit_on_nodes(cfg) -> tuple[object, list[str]]:
    """Fit, and return the node ids the run's own workers ran on."""
    before = train_workers()
    summary = fit(cfg, verbose=False)
    return summary, [node for actor, node in train_workers().items() if actor not in before]


def test_two_workers_spread_over_two_nodes_train_like_one_node(cluster, data_dir, tmp_path):
    c, nodes = cluster
    base = smoke().replace(data_dir=data_dir, output=str(tmp_path), num_workers=2, cpus_per_worker=0.5,
                           steps=12, eval_every=12, max_rows=240)
    spread, spread_nodes = fit_on_nodes(base.replace(name="spread", placement_strategy="STRICT_SPREAD"))
    packed, packed_nodes = fit_on_nodes(base.replace(name="packed", placement_strategy="STRICT_PACK"))
    worker_node_ids = {n.node_id for n in nodes}
    assert len(spread_nodes) == 2 and len(set(spread_nodes)) == 2       # one worker per node
    assert len(packed_nodes) == 2 and len(set(packed_nodes)) == 1       # both on one node
    assert set(spread_nodes) | set(packed_nodes) <= worker_node_ids     # never on the head
    assert spread.metrics["step"] == packed.metrics["step"] == 12
    for key in ("val_sst", "val_quora", "val_sts", "train_loss"):
        assert spread.metrics[key] == pytest.approx(packed.metrics[key], rel=1e-4, abs=1e-4), key
