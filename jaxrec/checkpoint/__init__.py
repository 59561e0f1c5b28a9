"""Checkpoints of training states with embedding collections, on orbax.

- :class:`CheckpointManager`: numbered steps (``max_to_keep``, :meth:`~CheckpointManager.latest_step`,
  :meth:`~CheckpointManager.all_steps`); a step holds the tables as whole per-table arrays
  under TorchRec's names, split by rows over the devices (each device writes its rows),
  the dense rest of the state as it is sharded, the step and JSON ``extra``.
- :class:`TableLayout`: where a collection sits in the state and how it is laid out
  (single device, or sharded under a :class:`~jaxrec.parallel.types.ShardingPlan`); a
  restore takes the target's layouts, so a checkpoint saved under one plan and device
  count restores under another.
- :func:`export_tables` / :func:`load_exported` / :func:`import_tables`: whole per-table
  arrays in a ``.npz`` for serving, and back into a state of any layout.

Example: ``jaxrec.checkpoint.manager``'s docstring.
"""

from jaxrec.checkpoint.export import export_tables, import_tables, load_exported
from jaxrec.checkpoint.manager import CheckpointManager, Restored
from jaxrec.checkpoint.tables import TableLayout

__all__ = [
    "CheckpointManager",
    "Restored",
    "TableLayout",
    "export_tables",
    "import_tables",
    "load_exported",
]
