"""Multi-stage zero-variance elimination (ZVE, DESIGN.md §4): numpy only, no torch."""

from runtime.filters.adaptive_group_size import (
    AdaptiveGroupSize,
    allocate_budget,
    grown_group_size,
    mixed_probability,
)
from runtime.filters.base import FLAT_TOL, Context, Group, PromptId, Request, Stage, is_flat
from runtime.filters.flat_groups import FlatGroups, PoolExhausted
from runtime.filters.history import History
from runtime.filters.ledger import Ledger, rollouts_per_informative_group
from runtime.filters.offline_pass_rate import OfflinePassRate, ScreenResult
from runtime.filters.pipeline import (
    STAGES,
    Batch,
    Pipeline,
    PromptSource,
    PromptStream,
    build_pipeline,
)
from runtime.filters.reward_shaping import RewardShaping, repeated_ngram_fraction

__all__ = [
    "FLAT_TOL",
    "STAGES",
    "AdaptiveGroupSize",
    "Batch",
    "Context",
    "FlatGroups",
    "Group",
    "History",
    "Ledger",
    "OfflinePassRate",
    "Pipeline",
    "PoolExhausted",
    "PromptId",
    "PromptSource",
    "PromptStream",
    "Request",
    "RewardShaping",
    "ScreenResult",
    "Stage",
    "allocate_budget",
    "build_pipeline",
    "grown_group_size",
    "is_flat",
    "mixed_probability",
    "repeated_ngram_fraction",
    "rollouts_per_informative_group",
]
