"""Preference losses by name, as configs select them (``loss: sigmoid``)."""

from __future__ import annotations

from typing import Any

from lit_tune.losses.conservative_dpo import ConservativeDPOLoss
from lit_tune.losses.dpo_sigmoid import SigmoidDPOLoss
from lit_tune.losses.hinge import HingeLoss
from lit_tune.losses.ipo import IPOLoss
from lit_tune.losses.orpo import ORPOLoss
from lit_tune.losses.preference import PreferenceLoss
from lit_tune.losses.simpo import SimPOLoss

PREFERENCE_LOSSES: dict[str, type[PreferenceLoss]] = {
    cls.name: cls
    for cls in (SigmoidDPOLoss, IPOLoss, HingeLoss, ConservativeDPOLoss, SimPOLoss, ORPOLoss)
}


def build_preference_loss(name: str, **options: Any) -> PreferenceLoss:
    """Build the preference loss registered under ``name``.

    Args:
        name: One of ``"sigmoid"``, ``"ipo"``, ``"hinge"``, ``"cdpo"``, ``"simpo"``, ``"orpo"``.
        **options: Constructor arguments of that loss class (``beta``, ``label_smoothing``,
            ``gamma``, ``average_log_probs``).

    Returns:
        The loss object.

    Raises:
        ValueError: If ``name`` is unknown, or an option is not an argument of that loss.
    """
    cls = PREFERENCE_LOSSES.get(name)
    if cls is None:
        raise ValueError(
            f"Unknown preference loss {name!r}. Choose one of {sorted(PREFERENCE_LOSSES)}."
        )
    try:
        return cls(**options)
    except TypeError as err:
        raise ValueError(
            f"Invalid options {options} for the {name!r} loss ({cls.__name__}): {err}. "
            f"See the arguments of {cls.__module__}.{cls.__name__}."
        ) from err


__all__ = ["PREFERENCE_LOSSES", "build_preference_loss"]
