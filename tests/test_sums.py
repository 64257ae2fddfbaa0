"""Sums worked in columns: every reply's steps and answer are right, for all small problems."""
import re

import pytest

from gptlab.data.sums import columns, follow_up_reply, worked, worked_double


def test_examples_read_as_documented():
    assert worked(59, "+", 63) == "59 + 63: 9+3=12, 5+6+1=12, so 122."
    assert worked(85, "-", 27) == "85 - 27: 15-7=8, 8-1-2=5, so 58."
    assert worked(156, "+", 7) == "156 + 7: 6+7=13, 5+0+1=6, 1+0=1, so 163."
    assert worked_double(156) == "Double 156: 6+6=12, 5+5+1=11, 1+1+1=3, so 312."
    assert follow_up_reply("double", 156, 0) == (worked_double(156), 312)
    assert follow_up_reply("sub", 163, 7) == ("163 - 7: 13-7=6, 6-1-0=5, 1-0=1, so 156.", 156)
    assert follow_up_reply("half", 156, 0) == ("Half of 156 is 78.", 78)
    assert follow_up_reply("mul", 12, 3) == ("12 * 3 = 36.", 36)


@pytest.mark.parametrize("op", "+-")
def test_every_column_is_right_and_the_answer_reads_off_the_columns(op):
    for a in range(0, 230):
        for b in range(0, 230, 7):
            if op == "-" and b > a:
                continue
            steps = columns(a, op, b).split(", ")
            digits, carry = [], 0
            for step in steps:
                m = re.fullmatch(r"(1?)(\d)(?:[-+](1))?[-+](\d)=(\d+)" if op == "-" else r"(\d)\+(\d)(?:\+(1))?=(\d+)",
                                 step)
                assert m, step
                if op == "+":
                    da, db, c, v = int(m[1]), int(m[2]), int(m[3] or 0), int(m[4])
                    assert c == carry and v == da + db + c
                    carry = v // 10
                    digits.append(v % 10)
                else:
                    ten, da, c, db, v = bool(m[1]), int(m[2]), int(m[3] or 0), int(m[4]), int(m[5])
                    assert c == carry and v == 10 * ten + da - c - db and 0 <= v <= 9 and ten == (da - c < db)
                    carry = int(ten)
                    digits.append(v)
            assert carry == 0 or op == "+"
            value = int("".join(map(str, ([carry] if carry else []) + digits[::-1])))
            assert value == (a + b if op == "+" else a - b)
            assert worked(a, op, b).endswith(f", so {value}.")


def test_a_difference_below_zero_is_refused():
    with pytest.raises(ValueError):
        columns(3, "-", 5)
