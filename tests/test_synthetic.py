"""benchmarks/synthetic.py: long-tailed activity, and the personal favourites of the positive control."""

import numpy as np

from benchmarks import synthetic


def test_every_user_gets_at_least_the_minimum_and_the_counts_add_up():
    user, item, timestamp = synthetic.interactions(users=50, total=3000, items=200, min_per_user=20)
    counts = np.bincount(user)[1:]
    assert len(user) == 3000 and counts.min() >= 20 and counts.max() > 3 * counts.min()
    assert item.min() >= 1 and item.max() <= 200
    assert all(np.all(np.diff(timestamp[user == u]) > 0) for u in range(1, 51))


def test_without_favourites_the_data_is_what_it_was():
    # Figures of the generator before it had favourites (commit c398d16): the synthetic benchmarks' data is unchanged.
    user, item, timestamp = synthetic.interactions(users=50, total=3000, items=200, favourites=0, repeat=0.7)
    assert item[:8].tolist() == [91, 5, 98, 1, 98, 98, 95, 93]
    assert int(item.sum()) == 235202 and int(timestamp.sum()) == 3000912349101


def top_share(items, top):
    """Share of a user's interactions that fall on their ``top`` most frequent items."""
    _, counts = np.unique(items, return_counts=True)
    return np.sort(counts)[::-1][:top].sum() / len(items)


def test_favourites_are_each_users_own_and_come_back_at_the_repeat_rate():
    user, item, _ = synthetic.interactions(users=50, total=3000, items=1000, favourites=3, repeat=1.0)
    assert max(len(set(item[user == u])) for u in range(1, 51)) <= 3
    user, item, _ = synthetic.interactions(users=200, total=20000, items=1000, favourites=3, repeat=0.4)
    share = np.mean([top_share(item[user == u], 3) for u in range(1, 201)])
    assert 0.35 < share < 0.6  # 0.4 expected: the favourites, plus the few other picks that land on them
    plain_user, plain_item, _ = synthetic.interactions(users=200, total=20000, items=1000)
    assert np.mean([top_share(plain_item[plain_user == u], 3) for u in range(1, 201)]) < 0.25
