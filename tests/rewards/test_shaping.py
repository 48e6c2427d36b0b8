"""Length shaping rewards against hand-computed values."""

import pytest

from posttrain.rewards.shaping import length_penalty, overlong_penalty


def test_overlong_penalty_is_dapo_eq_13():
    # max 10, cache 4: free up to 6 tokens; 8 tokens -> (6 - 8) / 4 = -0.5; 10 -> -1.0; 11 -> -1 (beyond the cap)
    ids = [[0] * n for n in (0, 6, 7, 8, 10, 11)]
    assert overlong_penalty([], [], completion_ids=ids, max_tokens=10, cache_tokens=4) == [0, 0, -0.25, -0.5, -1, -1]
    with pytest.raises(ValueError, match="cache_tokens <= max_tokens"):
        overlong_penalty([], [], completion_ids=ids, max_tokens=4, cache_tokens=5)
    with pytest.raises(TypeError, match="needs `completion_ids`"):
        overlong_penalty(["p"], ["c"], max_tokens=4, cache_tokens=2)


def test_length_penalty_is_linear_up_to_the_cap():
    ids = [[0] * n for n in (0, 5, 10, 20)]
    assert length_penalty([], [], completion_ids=ids, max_tokens=10, coef=0.2) == [0.0, -0.1, -0.2, -0.2]
