"""`toy.py protocol`'s arithmetic (toy_protocol.py): paired differences with t intervals, the
links, the arms chosen (no model runs: rows as protocol() builds them, with hand-checkable values).

    python -m pytest -q tests/test_protocol.py
"""
import math

import pytest

import metrics
import toy
import toy_protocol


def test_paired_worked_example():
    # differences 0.1, 0.2, 0.3, every one with the arm above AR:
    # mean 0.2, s = 0.1, t(2) = 4.3027, half-width 4.3027 * 0.1 / sqrt(3) = 0.2484
    values = [{"ar": 0.5, "x": 0.6}, {"ar": 0.4, "x": 0.6}, {"ar": 0.3, "x": 0.6},
              {"ar": 0.3, "x": None}]
    d = metrics.paired(values, "x")
    # the pair with no value is left out
    assert d["n"] == 3 and d["wins"] == 3
    assert d["mean"] == pytest.approx(0.2)
    assert d["ci95"] == pytest.approx([0.2 - 0.2484, 0.2 + 0.2484], abs=1e-4)
    assert metrics.paired([{"ar": 0.1}], "x") is None
    assert metrics.paired_cell(d) == "+0.200 [-0.048, +0.448] 3/3"
    # one pair: no interval
    one = metrics.paired([{"ar": 0.5, "x": 0.4}], "x")
    assert one["low"] is None and metrics.paired_cell(one) == "-0.100 0/1"
    assert metrics.paired_cell(None) == "-"


def rows(worlds=(0, 1), seeds=(0, 1, 2), sizes=(40,)):
    """Protocol rows where lavender = ar + 0.01 * (seed + 1) in every measure, base = 0.3 and the DM
    points at 0.5 + 0.1 * world."""
    out = []
    for w in worlds:
        for s in seeds:
            arms = {"ar": 0.4 + 0.01 * w, "lavender": 0.4 + 0.01 * w + 0.01 * (s + 1),
                    "base": 0.3, "lavender head": 0.9}
            arms.update({f"{k}-n{n}": arms[k] for n in sizes for k in ("ar", "lavender")})
            row = {"world": w, "seed": s, "dm pointing test-id": 0.5 + 0.1 * w,
                   "dm entropy test-id": 6.8}
            row.update({name: dict(arms) for name in toy_protocol.MEASURES})
            row["accuracy when own map points / misses (test-id)"] = {
                k: (0.6, 0.4, 30, 70) for k in ("base", "ar", "lavender")}
            out.append(row)
    return out


def test_protocol_table_pairs_by_world_and_seed():
    table = toy_protocol.protocol_table(rows())
    lav = table["accuracy test-id"]["lavender"]
    # (0.01 + 0.02 + 0.03) / 3, both worlds
    assert lav["n"] == 6 and lav["mean"] == pytest.approx(0.02)
    # protocol.json's keys
    assert [lav["low"], lav["high"]] == lav["ci95"] and lav["low"] < 0.02 < lav["high"]
    # 0.3 - (0.40, 0.41)
    assert table["accuracy test-id"]["base"]["mean"] == pytest.approx(-0.105)
    assert table["accuracy test-id"]["lavender-n40"]["mean"] == pytest.approx(0.02)
    links = table["links"]
    # (a) per world, one pair each: DM 0.5 / 0.6 against base 0.3 -> 0.2, 0.3
    assert links["(a) DM - base own pointing (per world)"]["n"] == 2
    assert links["(a) DM - base own pointing (per world)"]["mean"] == pytest.approx(0.25)
    assert links["(b) Lavender - base own pointing"]["mean"] == pytest.approx(0.125)
    assert table["grounded answers"]["ar"]["mean"] == pytest.approx(0.2)
    assert toy_protocol.data_sizes(rows(sizes=(40, 80))) == [40, 80]
    assert toy_protocol.data_sizes(rows(sizes=())) == []


def test_protocol_markdown_has_every_arm_and_link():
    result = {"rows": rows(), "paired": toy_protocol.protocol_table(rows())}
    text = toy_protocol.protocol_markdown(result)
    assert "| lavender | +0.020 [" in text and "| lavender-n40 |" in text
    assert "(a) DM - base own pointing (per world): +0.250" in text
    # AR's row of means: numbers, not nan
    ar_row = text.split("| ar | ")[1].split("\n")[0]
    assert not any(math.isnan(float(x)) for x in ar_row.split(" | ")[:3])


def test_protocol_arms():
    args = toy.build_parser().parse_args(["protocol"])
    assert list(toy_protocol.protocol_arms(args)) == list(toy_protocol.ARMS)
    args = toy.build_parser().parse_args(["protocol", "--follow-ups"])
    assert list(toy_protocol.protocol_arms(args)) == [*toy_protocol.ARMS, *toy_protocol.FOLLOW_UPS]
    args = toy.build_parser().parse_args(["protocol", "--arms", "own-direct", "--data-sizes"])
    own_direct = toy_protocol.FOLLOW_UPS["own-direct"]
    assert toy_protocol.protocol_arms(args) == {"lavender": {}, "own-direct": own_direct}
    assert args.data_sizes == []
    typo = toy.build_parser().parse_args(["protocol", "--arms", "own-drect"])
    with pytest.raises(SystemExit, match="--arms own-drect: no such arm"):
        toy_protocol.protocol_arms(typo)
