"""Rewards: verifiers, tie-aware pairwise judges and their composition (DESIGN.md §4)."""

from runtime.rewards.arithmetic import ArithmeticVerifier
from runtime.rewards.base import Judge, Verdict, Verifier
from runtime.rewards.composer import VERIFIERS, GroupRewards, RewardComposer, build_reward
from runtime.rewards.http_judge import HTTPJudge, JudgeError, parse_verdict
from runtime.rewards.math_verifier import MathVerifier
from runtime.rewards.pairwise import pairwise_rewards
from runtime.rewards.rule_judge import RuleJudge

__all__ = [
    "VERIFIERS",
    "ArithmeticVerifier",
    "GroupRewards",
    "HTTPJudge",
    "Judge",
    "JudgeError",
    "MathVerifier",
    "RewardComposer",
    "RuleJudge",
    "Verdict",
    "Verifier",
    "build_reward",
    "pairwise_rewards",
    "parse_verdict",
]
