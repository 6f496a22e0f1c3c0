"""The cluster the planner shards for: compute device, world size, ranks per host, memory per rank.

Built with TorchRec's ``TopologyFactory`` so the same description serves the live job (sizes read
from the process group and the machine) and an offline capacity plan (sizes given by the user).
"""

import os
from dataclasses import dataclass
from typing import Optional

import torch
from torchrec.distributed.planner.types import KernelConfig, Topology, TopologyFactory, TrainerConfig

GIB = 1024**3


@dataclass(frozen=True)
class ClusterSpec:
    """What the planner needs to know about the cluster.

    world_size:        total ranks (nnodes x nproc_per_node).
    local_world_size:  ranks per host.
    compute_device:    "cpu" or "cuda".
    hbm_bytes:         accelerator memory per rank (0 on CPU).
    ddr_bytes:         host memory per rank.
    """

    world_size: int
    local_world_size: int
    compute_device: str = "cpu"
    hbm_bytes: int = 0
    ddr_bytes: int = 16 * GIB

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {self.world_size}")
        if not 1 <= self.local_world_size <= self.world_size or self.world_size % self.local_world_size:
            raise ValueError(f"local_world_size must divide world_size={self.world_size}, got {self.local_world_size}")
        if self.compute_device not in ("cpu", "cuda"):
            raise ValueError(f"compute_device must be 'cpu' or 'cuda', got {self.compute_device!r}")
        if self.hbm_bytes < 0 or self.ddr_bytes <= 0:
            raise ValueError(f"hbm_bytes must be >= 0 and ddr_bytes > 0, got {self.hbm_bytes}, {self.ddr_bytes}")


def make_topology(spec: ClusterSpec) -> Topology:
    """A TorchRec ``Topology`` for ``spec`` (no process group needed)."""
    trainer = TrainerConfig(
        world_size=spec.world_size,
        local_world_size=spec.local_world_size,
        hbm_cap_bytes=spec.hbm_bytes,
        ddr_cap_bytes=spec.ddr_bytes,
    )
    return TopologyFactory.create_topology(trainer_config=trainer, kernel_config=KernelConfig(compute_device=spec.compute_device))


def detect_cluster(world_size: int, local_world_size: int, device: torch.device, ddr_bytes: Optional[int] = None) -> ClusterSpec:
    """The live job's cluster: HBM of the local accelerator, host memory split over the local ranks."""
    hbm = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else 0
    if ddr_bytes is None:
        ddr_bytes = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // local_world_size
    return ClusterSpec(world_size, local_world_size, device.type, hbm, ddr_bytes)

