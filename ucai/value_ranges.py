"""Number types that carry their allowed range, for the settings of stages and data.

A signature annotated with one of these makes jsonargparse refuse an out-of-range value
while it parses the config, naming the option and the value, before any class is built
or any model loads. They are `int`/`float` subclasses, so code reading the settings
needs no change; a class built directly in Python is not checked.

jsonargparse provides the common ranges (`PositiveInt`, `NonNegativeInt`,
`PositiveFloat`, `NonNegativeFloat`, `ClosedUnitInterval` [0, 1], `OpenUnitInterval`
(0, 1)); the others below are ranges specific to ucai settings.
"""

from __future__ import annotations

import torch
from jsonargparse.typing import (
    ClosedUnitInterval,
    NonNegativeFloat,
    NonNegativeInt,
    OpenUnitInterval,
    PositiveFloat,
    PositiveInt,
    restricted_number_type,
)

# Nucleus sampling keeps the smallest set of tokens with this much probability: 1.0
# keeps all, 0 would keep none.
NucleusMass = restricted_number_type(
    "NucleusMass", float, [(">", 0.0), ("<=", 1.0)], docstring="A probability mass in (0, 1]."
)
# A share that must leave something over (a validation fraction that keeps training data).
FractionBelowOne = restricted_number_type(
    "FractionBelowOne", float, [(">=", 0.0), ("<", 1.0)], docstring="A fraction in [0, 1)."
)
# A distance of a probability from 0.5 (ties, margins): 0.5 and more would cover every
# probability.
MarginFromHalf = restricted_number_type(
    "MarginFromHalf", float, [(">=", 0.0), ("<", 0.5)], docstring="A distance from 0.5 in [0, 0.5)."
)
# The probability that the preferred response of a pair is the better one.
PreferenceProbability = restricted_number_type(
    "PreferenceProbability", float, [(">=", 0.5), ("<=", 1.0)], docstring="A probability in [0.5, 1]."
)
# A token budget with room for at least one prompt token and one response token.
AtLeastTwo = restricted_number_type("AtLeastTwo", int, [(">=", 2)], docstring="An integer of 2 or more.")

__all__ = [
    "AtLeastTwo",
    "ClosedUnitInterval",
    "FractionBelowOne",
    "MarginFromHalf",
    "NonNegativeFloat",
    "NonNegativeInt",
    "NucleusMass",
    "OpenUnitInterval",
    "PositiveFloat",
    "PositiveInt",
    "PreferenceProbability",
]

# Parsed settings end up in checkpoints (hyperparameters, optimiser settings), and
# checkpoints are loaded with weights_only=True, which refuses classes it does not know.
torch.serialization.add_safe_globals([globals()[name] for name in __all__])
