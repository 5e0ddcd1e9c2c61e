"""The reduction both products share: MI between images, tiling of the MI matrix, DRMI and
partitioned reduction (SPEC sections 1-2).

Public names are importable from here; the modules hold them.
"""

from obliviate.reduction.drmi import (
    Aggregate,
    DenseRows,
    ReductionResult,
    RestartRecord,
    RowSource,
    choose_starts,
    drmi_reduce,
    greedy_init,
    one_hot_replacement,
    restart_from_rows,
    run_restarts,
    subset_cost,
)
from obliviate.reduction.mi import (
    PreparedImages,
    mi_matrix,
    mi_tile,
    mutual_information,
    prepare_images,
    quantize,
)
from obliviate.reduction.partitioned import (
    PartitionedResult,
    partition_budgets,
    partitioned_reduce,
)
from obliviate.reduction.tiling import (
    FLOAT32_BYTES,
    TilePlan,
    TileSpec,
    plan_report,
)

__all__ = [
    "FLOAT32_BYTES",
    "Aggregate",
    "DenseRows",
    "PartitionedResult",
    "PreparedImages",
    "ReductionResult",
    "RestartRecord",
    "RowSource",
    "TilePlan",
    "TileSpec",
    "choose_starts",
    "drmi_reduce",
    "greedy_init",
    "mi_matrix",
    "mi_tile",
    "mutual_information",
    "one_hot_replacement",
    "partition_budgets",
    "partitioned_reduce",
    "plan_report",
    "prepare_images",
    "quantize",
    "restart_from_rows",
    "run_restarts",
    "subset_cost",
]
