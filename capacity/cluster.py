"""The cluster being sized: nodes x ranks per node, memory per accelerator and per host.

Units: ``--hbm-gb`` and ``--ddr-gb`` are GiB (2**30 bytes). HBM is per accelerator (per rank); DDR is
per host and shared by the host's ranks. TorchRec's ``Topology`` counts DDR per rank, so each rank gets
an even share ``ddr_per_host // nproc_per_node`` of its host's memory.
"""

from dataclasses import dataclass

from torchrec.distributed.planner import Topology

from common.errors import UserError
from sharding.topology import GIB, ClusterSpec, make_topology


@dataclass(frozen=True)
class Cluster:
    """nnodes hosts with nproc_per_node ranks each; hbm_bytes per rank (0 for CPU ranks), ddr_bytes per host."""

    nnodes: int
    nproc_per_node: int
    hbm_bytes: int
    ddr_bytes: int
    compute_device: str

    def __post_init__(self) -> None:
        if self.nnodes < 1:
            raise UserError(f"--nnodes: must be >= 1 (got {self.nnodes})")
        if self.nproc_per_node < 1:
            raise UserError(f"--nproc-per-node: must be >= 1 (got {self.nproc_per_node})")
        if self.compute_device not in ("cpu", "cuda"):
            raise UserError(f"--compute-device: must be cpu or cuda (got {self.compute_device!r})")
        if self.compute_device == "cuda" and self.hbm_bytes <= 0:
            raise UserError("--hbm-gb: must be > 0 with --compute-device cuda")
        if self.ddr_bytes <= 0:
            raise UserError("--ddr-gb: must be > 0")

    @property
    def world_size(self) -> int:
        return self.nnodes * self.nproc_per_node

    @property
    def ddr_per_rank(self) -> int:
        """The host's DDR split evenly over its ranks (what the planner sees per rank)."""
        return self.ddr_bytes // self.nproc_per_node

    def host_of(self, rank: int) -> int:
        return rank // self.nproc_per_node

    def topology(self) -> Topology:
        """TorchRec ``Topology`` for an offline plan (no process group is created), via ``sharding.topology``."""
        hbm = self.hbm_bytes if self.compute_device == "cuda" else 0
        return make_topology(ClusterSpec(self.world_size, self.nproc_per_node, self.compute_device, hbm, self.ddr_per_rank))


def cluster_from_gib(nnodes: int, nproc_per_node: int, hbm_gb: float, ddr_gb: float, compute_device: str) -> Cluster:
    """A ``Cluster`` from the CLI's GiB figures."""
    return Cluster(nnodes, nproc_per_node, int(hbm_gb * GIB), int(ddr_gb * GIB), compute_device)
