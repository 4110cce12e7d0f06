"""Curricula C(t, l), step by step against hand-written tables."""
import pytest

from layerskip.training.curriculum import Curriculum


def test_rotational_step_by_step():
    # L = 8, R = 3: layers with (l - t) mod 3 == 0, plus the last layer (7) always
    c = Curriculum("rotational", num_layers=8, rotation=3)
    expected = {
        0: [0, 3, 6, 7],
        1: [1, 4, 7],
        2: [2, 5, 7],
        3: [0, 3, 6, 7],
        4: [1, 4, 7],
        5: [2, 5, 7],
    }
    for t, active in expected.items():
        assert c.active(t) == active, t


def test_rotational_visits_every_layer_once_per_period():
    L, R = 16, 8
    c = Curriculum("rotational", num_layers=L, rotation=R)
    for start in (0, 5, 1000):
        seen = [l for t in range(start, start + R) for l in c.active(t) if l != L - 1]
        assert sorted(seen) == list(range(L - 1))  # each layer below the last: exactly once per R steps
    assert all(L - 1 in c.active(t) for t in range(40))


def test_rotational_r1_and_r_beyond_depth():
    assert Curriculum("rotational", 4, rotation=1).active(5) == [0, 1, 2, 3]
    c = Curriculum("rotational", 4, rotation=8)
    assert [c.active(t) for t in range(9)] == [[0, 3], [1, 3], [2, 3], [3], [3], [3], [3], [3], [0, 3]]


def test_gradual_step_by_step():
    # L = 4, T = 16: one more exit every T/(2L) = 2 steps from the top; all on from t = 6 (< T/2 = 8)
    c = Curriculum("gradual", num_layers=4, total_steps=16)
    expected = [[3], [3], [2, 3], [2, 3], [1, 2, 3], [1, 2, 3], [0, 1, 2, 3], [0, 1, 2, 3], [0, 1, 2, 3]]
    assert [c.active(t) for t in range(9)] == expected
    assert c.active(15) == [0, 1, 2, 3]


def test_gradual_uneven_interval():
    # L = 3, T = 10: exit l switches on at t >= (2 - l) * 10 / 6, i.e. layer 1 at t = 2 (1.67), layer 0 at t = 4 (3.33)
    c = Curriculum("gradual", num_layers=3, total_steps=10)
    assert [c.active(t) for t in range(6)] == [[2], [2], [1, 2], [1, 2], [0, 1, 2], [0, 1, 2]]


@pytest.mark.parametrize("L,T", [(2, 4), (8, 100), (32, 1000)])
def test_gradual_all_on_by_half(L, T):
    c = Curriculum("gradual", num_layers=L, total_steps=T)
    assert c.active(T // 2) == list(range(L))
    counts = [len(c.active(t)) for t in range(T)]
    assert counts == sorted(counts) and counts[0] == 1  # monotone, from the last layer only


def test_none_is_every_layer():
    assert Curriculum("none", 5).active(0) == Curriculum("none", 5).active(77) == [0, 1, 2, 3, 4]


def test_last_is_the_last_layer_only():
    assert Curriculum("last", 5).active(0) == Curriculum("last", 5).active(9) == [4]


def test_bad_curricula_are_rejected():
    with pytest.raises(ValueError, match="unknown curriculum"):
        Curriculum("random", 4)
    with pytest.raises(ValueError, match="rotation"):
        Curriculum("rotational", 4, rotation=0)
