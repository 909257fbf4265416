"""The spec: one pydantic model per YAML section (the code is the truth; DESIGN.md §2 the outline).

Shape is checked here (types, ranges, unknown keys, rules inside one section). Meaning that
spans sections (parallel grids, batch arithmetic, memory) is checked in `compiler.checks`.
When some values do not validate, the section rules and the checks still run on the values
that did (`spec.partial`), so a user sees every problem of a file in one run.

One module per section of a spec file: `model`, `cluster`, `train` (with `sft`), `rollout`,
`data`, `reward`, `filters`, `algorithm` (with `router_replay`), and `root`, the `Spec` itself
with `system`, `eval` and `export`; `base` holds the `Section` base they share. Every name is
re-exported here, so code imports from `spec.models` and need not know the layout.
"""

from spec.models.algorithm import (
    KL,
    Advantage,
    Algorithm,
    CISPOParams,
    Correction,
    ESPOParams,
    GRPOParams,
    GSPOParams,
    RouterReplay,
)
from spec.models.base import Fraction, NonNegInt, PosFloat, PosInt, Section
from spec.models.cluster import Cluster, Container
from spec.models.data import ArithmeticTask, Data
from spec.models.filters import (
    AdaptiveGroupSize,
    FilterStage,
    FlatGroups,
    History,
    LengthPenalty,
    OfflinePassRate,
    RepetitionPenalty,
    RewardShaping,
)
from spec.models.model import MLA, Architecture, Model, MoE
from spec.models.reward import Judge, Reward, Verifier
from spec.models.rollout import Rollout, RolloutParallelism, Sampling
from spec.models.root import Eval, Export, Spec, System
from spec.models.train import SFT, SFT_OPTIMIZER, Checkpointing, Optimizer, Train, TrainParallelism

__all__ = [
    "KL",
    "MLA",
    "SFT",
    "SFT_OPTIMIZER",
    "AdaptiveGroupSize",
    "Advantage",
    "Algorithm",
    "Architecture",
    "ArithmeticTask",
    "CISPOParams",
    "Checkpointing",
    "Cluster",
    "Container",
    "Correction",
    "Data",
    "ESPOParams",
    "Eval",
    "Export",
    "FilterStage",
    "FlatGroups",
    "Fraction",
    "GRPOParams",
    "GSPOParams",
    "History",
    "Judge",
    "LengthPenalty",
    "MoE",
    "Model",
    "NonNegInt",
    "OfflinePassRate",
    "Optimizer",
    "PosFloat",
    "PosInt",
    "RepetitionPenalty",
    "Reward",
    "RewardShaping",
    "Rollout",
    "RolloutParallelism",
    "RouterReplay",
    "Sampling",
    "Section",
    "Spec",
    "System",
    "Train",
    "TrainParallelism",
    "Verifier",
]
