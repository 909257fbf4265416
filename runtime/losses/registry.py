"""The loss registry.

``LOSSES`` maps a name (``"grpo"``, ``"gspo"``, ``"espo"``, ``"cispo"``) to a
:class:`LossSpec`; :func:`register_loss` adds one; :func:`compute_loss` looks a loss up,
merges the spec's ``algorithm.<loss>`` parameters over the defaults (unknown keys raise
``ValueError``) and calls it. The four built-in losses are registered when this module is
imported (so whenever ``runtime.losses`` is).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from torch import Tensor

from runtime.losses.base import LossOutput
from runtime.losses.cispo import cispo_loss
from runtime.losses.espo import espo_loss
from runtime.losses.grpo import grpo_loss
from runtime.losses.gspo import gspo_loss


@dataclass(frozen=True)
class LossSpec:
    """A registered loss: its function, its tunable parameters with defaults, and its inputs.

    ``defaults`` holds exactly the keyword parameters a spec's ``algorithm.<loss>`` section
    may set; ``needs_entropy`` / ``needs_vocab_size`` say whether ``compute_loss`` must be
    given ``entropy`` / ``vocab_size``.
    """

    fn: Callable[..., LossOutput]
    defaults: dict[str, Any]
    needs_entropy: bool
    needs_vocab_size: bool = False


LOSSES: dict[str, LossSpec] = {}

_F = TypeVar("_F", bound=Callable[..., LossOutput])
_DATA_PARAMS = frozenset({"token_weight", "vocab_size"})


def register_loss(name: str) -> Callable[[_F], _F]:
    """Decorator: register ``fn`` as loss ``name`` in :data:`LOSSES`.

    ``fn(logp, old_logp, advantages, mask[, entropy], *, <params with defaults>,
    [vocab_size], token_weight=None) -> LossOutput``. The keyword-only parameters with
    defaults (other than ``token_weight``) become ``LossSpec.defaults``.
    """

    def deco(fn: _F) -> _F:
        if name in LOSSES:
            raise ValueError(f"loss {name!r} is already registered")
        params = inspect.signature(fn).parameters
        defaults = {
            p.name: p.default
            for p in params.values()
            if p.kind is inspect.Parameter.KEYWORD_ONLY
            and p.default is not inspect.Parameter.empty
            and p.name not in _DATA_PARAMS
        }
        LOSSES[name] = LossSpec(
            fn=fn,
            defaults=defaults,
            needs_entropy="entropy" in params,
            needs_vocab_size="vocab_size" in params,
        )
        return fn

    return deco


register_loss("grpo")(grpo_loss)
register_loss("gspo")(gspo_loss)
register_loss("espo")(espo_loss)
register_loss("cispo")(cispo_loss)


def compute_loss(
    name: str,
    params: Mapping[str, Any] | None = None,
    *,
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    entropy: Tensor | None = None,
    vocab_size: int | None = None,
    token_weight: Tensor | None = None,
) -> LossOutput:
    """Compute loss ``name`` with ``params`` (the spec's ``algorithm.<name>`` section).

    Missing params take the loss's defaults; an unknown loss name or parameter raises
    ``ValueError``, as does a missing ``entropy`` / ``vocab_size`` for a loss that needs it.
    """
    spec = LOSSES.get(name)
    if spec is None:
        raise ValueError(f"unknown loss {name!r}; known losses: {sorted(LOSSES)}")
    params = dict(params or {})
    unknown = sorted(set(params) - set(spec.defaults))
    if unknown:
        raise ValueError(
            f"unknown parameter(s) {unknown} for loss {name!r}; allowed: {sorted(spec.defaults)}"
        )
    kwargs: dict[str, Any] = {**spec.defaults, **params}
    args: list[Tensor] = [logp, old_logp, advantages, mask]
    if spec.needs_entropy:
        if entropy is None:
            raise ValueError(f"loss {name!r} needs entropy (the old policy's token entropy)")
        args.append(entropy)
    if spec.needs_vocab_size:
        if vocab_size is None:
            raise ValueError(f"loss {name!r} needs vocab_size")
        kwargs["vocab_size"] = vocab_size
    return spec.fn(*args, token_weight=token_weight, **kwargs)
