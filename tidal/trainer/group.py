"""The trainer as a group of Ray actors: `trainer.num_ranks` DeepSpeed ranks in a placement group.

The driver talks to the group as it talked to one trainer: `call(method, ...)` runs a method on every
rank (the collective ones: step, publish, save) and `rank0` is the rank that faces the buffer and the
workers. Each rank is a `TrainerActor` that joins one torch.distributed world (gloo on CPU, NCCL on
GPU) through the address of rank 0's node, and Ray's placement group keeps the ranks' CPUs and GPUs
reserved together, packed onto few nodes or spread over many (`trainer.placement`).
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import Any

from tidal.config import TrainerConfig
from tidal.runtime import RunError, wait_for


@dataclass(frozen=True)
class RankInfo:
    """Where a trainer rank sits in the DeepSpeed world: its rank, the world size, rank 0's address."""

    rank: int
    world_size: int
    master_addr: str
    master_port: int

    def environ(self) -> dict[str, str]:
        """torch.distributed's env:// variables. Ray shows each rank only its own GPUs, so the local
        device is always the first visible one."""
        return {
            "RANK": str(self.rank),
            "WORLD_SIZE": str(self.world_size),
            "LOCAL_RANK": "0",
            "MASTER_ADDR": self.master_addr,
            "MASTER_PORT": str(self.master_port),
        }


def _node_address() -> tuple[str, int]:
    """(IP, free port) of the node this runs on; run in rank 0's bundle to host the rendezvous."""
    import ray

    with socket.socket() as s:
        s.bind(("", 0))
        return ray.util.get_node_ip_address(), s.getsockname()[1]


class TrainerGroup:
    """`num_ranks` trainer actors of class `cls`, each built as `cls(*args, rank=RankInfo)`; one rank
    is a plain actor with no placement group, as before scale-out."""

    def __init__(self, cls: type, cfg: TrainerConfig, args: tuple[Any, ...], timeout_s: float) -> None:
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        actor = ray.remote(cls)
        resources = {"num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus}
        self.placement_group = None
        n = cfg.num_ranks
        if n == 1:
            self.ranks = [actor.options(**resources).remote(*args)]
            return
        bundle = {"CPU": cfg.num_cpus, **({"GPU": cfg.num_gpus} if cfg.num_gpus else {})}
        pg = placement_group([bundle] * n, strategy=cfg.placement.upper())
        self.placement_group = pg
        ready, _ = ray.wait([pg.ready()], timeout=timeout_s)
        if not ready:
            ray.util.remove_placement_group(pg)
            free = {k: v for k, v in ray.available_resources().items() if k in ("CPU", "GPU")}
            raise RunError(
                f"the cluster cannot place trainer.num_ranks={n} ranks of {bundle} "
                f"(trainer.placement={cfg.placement}) within ray.stall_timeout_s={timeout_s:g}s; "
                f"free now: {free}"
            )

        def in_bundle(i: int) -> PlacementGroupSchedulingStrategy:
            return PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i)

        address = wait_for(
            ray.remote(_node_address).options(num_cpus=0, scheduling_strategy=in_bundle(0)).remote(),
            "trainer rank 0's address",
            timeout_s,
        )
        self.ranks = [
            actor.options(**resources, scheduling_strategy=in_bundle(i)).remote(*args, rank=RankInfo(i, n, *address))
            for i in range(n)
        ]

    @property
    def rank0(self) -> Any:
        """The rank that takes batches from the buffer, publishes weights and keeps the ledger."""
        return self.ranks[0]

    def call(self, method: str, *args: Any, **kwargs: Any) -> list[Any]:
        """`method` on every rank (a collective call must reach them all); the ranks' ObjectRefs."""
        return [getattr(rank, method).remote(*args, **kwargs) for rank in self.ranks]

    def close(self) -> None:
        """End the ranks and free their placement group."""
        import ray

        for rank in self.ranks:
            ray.kill(rank)
        if self.placement_group is not None:
            ray.util.remove_placement_group(self.placement_group)
            self.placement_group = None
