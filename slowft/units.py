"""The unit contract, in one place: what a unit is called, their order, and which of a unit's
tensors are weights and which its optimizer's state.

A unit is what is stored, loaded and updated as one file: the token embedding, each transformer
block, and the head (final norm + output projection). A unit's file holds its weights under
their Meta names within the unit (``attention.wq.weight``) and its optimizer's state under
``optim.<weight>.<key>``, so state travels with the weights it belongs to.
"""
from __future__ import annotations

EMBEDDING = "tok_embeddings"
HEAD = "head"
LAYER = "layers."
STATE = "optim."


def layer(i: int) -> str:
    return f"{LAYER}{i}"


def is_layer(unit: str) -> bool:
    return unit.startswith(LAYER)


def layer_index(unit: str) -> int:
    return int(unit[len(LAYER):])


def layers(n_layers: int) -> list[str]:
    return [layer(i) for i in range(n_layers)]


def forward_order(n_layers: int) -> list[str]:
    return [EMBEDDING, *layers(n_layers), HEAD]


def backward_order(n_layers: int) -> list[str]:
    """The order a step updates units in: the head, the blocks top-down, the embedding last (so a
    resumed step's forward through the units not yet updated is exactly the original forward)."""
    return [HEAD, *reversed(layers(n_layers)), EMBEDDING]


def is_state(name: str) -> bool:
    """Whether a tensor of a unit's file is optimizer state rather than a weight."""
    return name.startswith(STATE)


def state_prefix(weight: str) -> str:
    return f"{STATE}{weight}."


def weights_of(tensors: dict) -> dict:
    return {k: v for k, v in tensors.items() if not is_state(k)}
