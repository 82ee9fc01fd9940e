"""The steps of a file's life, one module each, each a function of (records, context):

    complete    --hash-->      hashed       steps/hash.py      one read: digests, name, first copy
    hashed      --register-->  registered   steps/register.py  DID, dataset, metadata
    registered  --transfer-->  copied       steps/transfer.py  copies written and verified
    copied      --record-->    transferred  steps/record.py    copies recorded, the lake's requested
    transferred --confirm-->   confirmed    steps/confirm.py   >= N verified replicas
    confirmed   --delete-->    deleted      steps/delete.py    guarded unlink of the unchanged file

Which step runs in which state, and in which worker pool, is core/lifecycle.py's STEPS table.
A step ends with one committed transition per record; a crash between an effect and its
transition repeats only that effect, and every effect is idempotent. Failures become moves in
steps/failures.py, by the error taxonomy.
"""

from __future__ import annotations

from typing import Callable, Sequence

from ..core.lifecycle import STEPS
from ..ledger import FileRecord
from . import confirm, delete, record, register, transfer
from . import hash as hash_step
from .context import Hooks, StepContext
from .ending import discard_unregistered

__all__ = ["Hooks", "StepContext", "discard_unregistered", "run"]

StepFunction = Callable[[Sequence[FileRecord], StepContext], None]
_BY_NAME: dict[str, StepFunction] = {"hash": hash_step.run, "register": register.run, "transfer": transfer.run,
                                     "record": record.run, "confirm": confirm.run, "delete": delete.run}


def run(batch: Sequence[FileRecord], ctx: StepContext) -> None:
    """Run the step leading out of the batch's state (every record in one state) for each record.
    Afterwards each has moved on, or failed into its wait, or was found moved by someone else."""
    if not batch:
        return
    state = batch[0].state
    if any(rec.state is not state for rec in batch):
        raise ValueError("a batch holds records of one state")
    _BY_NAME[STEPS[state].name](batch, ctx)
