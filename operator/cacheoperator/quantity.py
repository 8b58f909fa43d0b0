"""Kubernetes resource quantities ("1Gi", "500m", 2) as the API accepts them.

The CRD marks these fields `x-kubernetes-int-or-string`, so a manifest may carry either a
plain integer or a quantity string; both are parsed with the kubernetes client's own parser
so the operator and the API server agree on what a value means.
"""

from __future__ import annotations

import re
from decimal import Decimal
from typing import Annotated, Any

from kubernetes.utils.quantity import parse_quantity
from pydantic import BeforeValidator, WithJsonSchema

# The quantity grammar of the API server, without a sign: a cache never asks for negative
# resources, so the schema rejects them before any rule has to.
QUANTITY_PATTERN = (
    r"^(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))"
    r"(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)
QUANTITY_MAX_LENGTH = 64
_QUANTITY_RE = re.compile(QUANTITY_PATTERN)

MIB = 1024 * 1024


def _check_quantity(value: Any) -> int | str:
    # bool is an int in Python, and YAML floats (cpu: 0.5) are not valid int-or-string values
    # for the API server either, so both get a message that says what to write instead.
    if isinstance(value, (bool, float)):
        raise ValueError(
            f"{value!r} is not a quantity: write an integer or a string such as '500m' or '1Gi'"
        )
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"{value} is negative")
        return value
    if isinstance(value, str):
        if len(value) > QUANTITY_MAX_LENGTH or not _QUANTITY_RE.fullmatch(value):
            raise ValueError(f"{value!r} is not a quantity such as '500m', '2' or '1Gi'")
        return value
    raise ValueError(f"{value!r} is not a quantity: write an integer or a string such as '1Gi'")


Quantity = Annotated[
    int | str,
    BeforeValidator(_check_quantity),
    WithJsonSchema(
        {
            "anyOf": [{"type": "integer"}, {"type": "string"}],
            "pattern": QUANTITY_PATTERN,
            "maxLength": QUANTITY_MAX_LENGTH,
            "x-kubernetes-int-or-string": True,
        }
    ),
]


def to_decimal(value: int | str) -> Decimal:
    """The exact value of a quantity (bytes for memory, cores for CPU)."""
    return parse_quantity(value)


def to_mebibytes(value: int | str) -> int:
    """Whole MiB, rounded down: the unit of the server's -m and --memory-headroom."""
    return int(to_decimal(value) // MIB)


_BINARY_SUFFIXES = (("Ei", 1 << 60), ("Pi", 1 << 50), ("Ti", 1 << 40), ("Gi", 1 << 30), ("Mi", MIB))


def format_bytes(value: int) -> str:
    """A byte count as the shortest exact quantity: 268435456 -> "256Mi", 1000 -> "1000"."""
    for suffix, unit in _BINARY_SUFFIXES:
        if value and value % unit == 0:
            return f"{value // unit}{suffix}"
    if value and value % 1024 == 0:
        return f"{value // 1024}Ki"
    return str(value)
