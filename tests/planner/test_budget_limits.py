import pytest

from peftplan.planner import Budget, BudgetError


def test_counts_and_percentages():
    assert Budget(params=250_000).param_limit(22_000_000) == 250_000
    assert Budget(params="0.5%").param_limit(22_000_000) == 110_000
    assert Budget(params=" 1% ").param_limit(1_000) == 10
    assert Budget().param_limit(1_000) is None


@pytest.mark.parametrize("value", [0.005, 1.0, True])
def test_floats_and_bools_are_ambiguous(value):
    with pytest.raises(BudgetError, match="ambiguous"):
        Budget(params=value)


@pytest.mark.parametrize(
    "value, message",
    [(0, "positive"), (-5, "positive"), ("0.5", "percentage"), ("abc%", "not a number"),
     ("0%", r"\(0, 100\]"), ("150%", r"\(0, 100\]"), ([1], "takes an int or a string")],
)  # fmt: skip
def test_malformed_budgets(value, message):
    with pytest.raises(BudgetError, match=message):
        Budget(params=value)


@pytest.mark.parametrize(
    "text, params",
    [("250000", 250_000), ("250_000", 250_000), ("250,000", 250_000), ("250k", 250_000),
     ("1.5M", 1_500_000), ("0.5%", "0.5%")],
)  # fmt: skip
def test_parse(text, params):
    assert Budget.parse(text) == Budget(params=params)


def test_parse_garbage():
    with pytest.raises(BudgetError, match="cannot read budget 'lots'"):
        Budget.parse("lots")


def test_dict_round_trip_and_str():
    for b in (Budget(params=1234), Budget(params="2%")):
        assert Budget.from_dict(b.to_dict()) == b
    assert str(Budget(params=1234)) == "params≤1,234"
    assert str(Budget(params="2%")) == "params≤2%"
