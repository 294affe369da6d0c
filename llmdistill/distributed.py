"""The processes of a run started by ``accelerate launch`` (or ``torchrun``), for loops that are not a
transformers ``Trainer``: ``onpolicy``'s, and the feature projection beside ``train``'s model.

:class:`Ranks` is a run's place among its processes, with the few collectives such a loop needs
(accelerate's own operations), and :func:`sum_gradients` the one gradient all-reduce of a
replicated (data-parallel) model.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

GRADIENT_BUCKET_BYTES = 256 << 20  # gradients all-reduced at once: bounded, whatever the model's size


@dataclass
class Ranks:
    """The processes of a run: one, or several started by ``accelerate launch`` (or ``torchrun``).

    ``onpolicy`` trains one student on several data-parallel, as DDP does: every process holds the
    whole student and its optimizer; each step each one samples, scores and back-propagates its own
    share of the step's prompts (:meth:`share`), the gradients are summed over all of them
    (:func:`sum_gradients`), and every process takes the same optimizer step, so their weights stay
    equal. The loss is normalised by the step's target tokens over all processes, so a step is the
    same update as one process computing it alone. The student is replicated, not sharded: a student
    whose weights, gradients and AdamW moments do not fit one device trains as a LoRA (``use_peft``).
    """

    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    local_rank: int = 0  # among the processes of this node

    @classmethod
    def start(cls) -> Ranks:
        """This process's place: joins the launcher's process group (gloo on a CPU host, NCCL on GPUs)."""
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return cls(device=torch.device("cuda" if torch.cuda.is_available() else "cpu"))
        from accelerate import PartialState

        state = PartialState(cpu=not torch.cuda.is_available())
        return cls(state.process_index, state.num_processes, state.device, state.local_process_index)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def share(self, items: list[Any]) -> list[Any]:
        """This process's contiguous part of a step's items (their count divides by :attr:`world`)."""
        size = len(items) // self.world
        return items[self.rank * size:(self.rank + 1) * size]

    def sum(self, values: list[float]) -> list[float]:
        """Each value summed over the processes (one all-reduce; the values themselves with one process)."""
        if self.world == 1:
            return values
        from accelerate.utils import reduce

        return reduce(torch.tensor(values, dtype=torch.float64, device=self.device), reduction="sum").tolist()

    def broadcast(self, value: Any) -> Any:
        """The main process's ``value`` on every process."""
        if self.world == 1:
            return value
        from accelerate.utils import broadcast_object_list

        return broadcast_object_list([value])[0]

    def barrier(self) -> None:
        if self.world > 1:
            from accelerate import PartialState

            PartialState().wait_for_everyone()


def sum_gradients(params: Iterable[torch.nn.Parameter], average: bool = False) -> None:
    """Every trainable parameter's gradient summed (or averaged) over the processes of a replicated model,
    in all-reduces of one dtype and at most :data:`GRADIENT_BUCKET_BYTES` each. A parameter no process
    has a gradient for keeps none (the optimizer skips it, as it would in one process); one that only
    some have counts zero on the others. Call it on every process, with the parameters in one order."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return
    params = [p for p in params if p.requires_grad]
    device = params[0].device if params else torch.device("cpu")
    reached = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=device)
    dist.all_reduce(reached)  # which gradients exist anywhere: the same list on every process
    grads = []
    for p, anywhere in zip(params, reached.tolist(), strict=True):
        if anywhere:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
    bucket: list[torch.Tensor] = []

    def flush() -> None:
        flat = torch.cat([g.reshape(-1) for g in bucket])
        dist.all_reduce(flat)
        if average:
            flat.div_(dist.get_world_size())
        for g, part in zip(bucket, flat.split([g.numel() for g in bucket]), strict=True):
            g.copy_(part.view_as(g))
        bucket.clear()

    for grad in grads:
        if bucket and (grad.dtype != bucket[0].dtype
                       or (sum(g.numel() for g in bucket) + grad.numel()) * grad.element_size() > GRADIENT_BUCKET_BYTES):
            flush()
        bucket.append(grad)
    if bucket:
        flush()
