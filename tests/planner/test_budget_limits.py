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
    [
        (0, "positive"),
        (-5, "positive"),
        ("0.5", "percentage"),
        ("abc%", "not a number"),
        ("0%", r"\(0, 100\]"),
        ("150%", r"\(0, 100\]"),
        ([1], "takes an int or a string"),
    ],
)
def test_malformed_budgets(value, message):
    with pytest.raises(BudgetError, match=message):
        Budget(params=value)


@pytest.mark.parametrize(
    "text, params",
    [
        ("250000", 250_000),
        ("250_000", 250_000),
        ("250,000", 250_000),
        ("250k", 250_000),
        ("1.5M", 1_500_000),
        ("0.5%", "0.5%"),
    ],
)
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


def test_other_limits_parse_and_convert():
    b = Budget(params="1%", memory="1.5 GiB", latency="2%", adapter_bytes="10MB")
    assert b.limits(total_params=1_000_000) == {
        "params": 10_000,
        "memory": int(1.5 * 2**30),
        "latency": 0.02,
        "adapter_bytes": 10 * 10**6,
    }
    assert Budget.from_dict(b.to_dict()) == b
    assert Budget(params=5, memory=4096).limits(10) == {"params": 5, "memory": 4096}
    for bad, message in [
        ({"memory": "2 parsecs"}, "string with a unit"),
        ({"memory": 0}, "positive number of bytes"),
        ({"latency": 0.02}, "percentage string"),
        ({"latency": "101%"}, r"\[0, 100\]"),
    ]:
        with pytest.raises(BudgetError, match=message):
            Budget(params=5, **bad)


def test_proxy_plan_over_another_limit_is_an_error():
    import peftplan as pp
    from tests import zoo

    model = zoo.bert()
    plan = pp.search(model, Budget(params="5%"))
    cost = pp.plan_cost(pp.lower(model), plan)
    assert pp.search(model, Budget(params="5%", adapter_bytes=cost.adapter_bytes)).sites == plan.sites
    with pytest.raises(BudgetError, match=r"other limits \(adapter_bytes"):
        pp.search(model, Budget(params="5%", adapter_bytes=cost.adapter_bytes - 1))
