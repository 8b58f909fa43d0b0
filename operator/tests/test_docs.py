"""docs/operator.md keeps up with the code it describes."""

from __future__ import annotations

import pytest

from cacheoperator.main import parse_args
from cacheoperator.rules import ALL_RULES
from operator_testkit import EXAMPLES, REPO

DOC = (REPO / "docs" / "operator.md").read_text()


@pytest.mark.parametrize("rule", ALL_RULES, ids=lambda r: r.id)
def test_every_validation_rule_is_documented(rule):
    assert f"`{rule.id}` | `{rule.full_field}`" in DOC


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("cachecluster-*.yaml")), ids=str)
def test_every_strategy_example_is_linked(path):
    assert f"examples/{path.name}" in DOC


def test_every_cli_flag_is_documented():
    parser_flags = [a for a in vars(parse_args([])) if a not in ("verbose",)]
    for flag in parser_flags:
        assert "--" + flag.replace("_", "-") in DOC, flag
