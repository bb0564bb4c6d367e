"""A round under ``accelerate launch``: which process this is, and rank 0's decisions shared with the others.

Knows the one rule that makes a round safe on several processes: everything that touches
the world outside the training itself (the round lock, the log's window, the registry,
the evaluation, the version's files, the metrics, the printed summary) happens on rank 0
only; the other ranks receive rank 0's plan and decisions (``Team.share``) and join the
collective training. Rank 0 ends every round with ``Team.finish``, which releases ranks
still waiting for a decision, so a round that rank 0 skips, or that fails on rank 0, never
leaves the others hanging; a rank that dies is the launcher's business (torchrun stops
the group). A single process is a team of one: ``share`` returns its argument, ``finish``
does nothing, and torch.distributed is never initialised. Does not know what a round does.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")


class Stopped(Exception):
    """Rank 0 ended the round while this rank waited for a decision; carries rank 0's outcome."""

    def __init__(self, outcome: str, reason: str) -> None:
        super().__init__(reason)
        self.outcome = outcome
        self.reason = reason


@dataclass(frozen=True)
class _Finish:
    outcome: str
    reason: str


class Team:
    """This process's place in the launch: ``rank`` of ``size``; rank 0 is the main process."""

    def __init__(self, rank: int = 0, size: int = 1, kind: str = "NO") -> None:
        self.rank, self.size, self.kind = rank, size, kind
        """``kind``: accelerate's distributed type (``MULTI_GPU``, ``MULTI_CPU``, ``FSDP``, ``DEEPSPEED``...)."""
        self._finished = size == 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def share(self, value: T | None = None) -> T:
        """Rank 0's ``value`` on every rank (the others pass nothing). Raises ``Stopped`` on a rank other than 0
        when rank 0 finished the round instead of deciding."""
        if not self.distributed:
            return value  # type: ignore[return-value]
        from accelerate.utils import broadcast_object_list

        box: list[Any] = [value if self.main else None]
        broadcast_object_list(box, from_process=0)
        if isinstance(box[0], _Finish):
            self._finished = True
            raise Stopped(box[0].outcome, box[0].reason)
        return box[0]  # type: ignore[no-any-return]

    def finish(self, outcome: str, reason: str) -> None:
        """On rank 0: tell ranks waiting in ``share`` that the round ended (once; a no-op for a single process)."""
        if self._finished or not self.main:
            return
        self._finished = True
        from accelerate.utils import broadcast_object_list

        broadcast_object_list([_Finish(outcome, reason)], from_process=0)


def team() -> Team:
    """The team of this launch: from the environment ``accelerate launch`` (torchrun) sets, with the process group
    initialised (gloo on CPU, nccl on GPUs) through accelerate's shared state, which the TRL trainer reuses."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return Team()
    import torch
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())  # as the trainer's TrainingArguments say (use_cpu)
    return Team(state.process_index, state.num_processes, str(state.distributed_type.value))


def close(team: Team) -> None:
    """Tear down the process group a distributed team initialised (torch warns at exit otherwise)."""
    if team.distributed:
        import torch.distributed

        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
