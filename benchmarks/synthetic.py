"""Synthetic interaction data with long-tailed user activity, as RecBole atomic files or as arrays.

Users' interaction counts follow a log-normal distribution (a few very active users, many light ones, like
MovieLens), shifted so that every user has at least ``min_per_user``; item popularity is Zipf-like; each user
drifts through the catalogue from a taste of their own, so sequences have structure a sequential model can learn.
Timestamps increase within each user.

    python -m benchmarks.synthetic --out=data --name=synthetic-ml-1m --users=6040 --interactions=1000000 --items=3706
    python -m benchmarks.synthetic --out=data --name=synthetic-1m-users --users=1000000 --interactions=20000000

writes ``data/<name>/<name>.inter`` (``user_id``, ``item_id``, ``timestamp``); run DCCL on it with
``--dataset=<name> --data_path=data``.
"""

import argparse
import os

import numpy as np


def activity(users, interactions, min_per_user, sigma, rng):
    """Interactions per user: log-normal, at least ``min_per_user``, summing to ``interactions``."""
    if interactions < users * min_per_user:
        raise ValueError(f"interactions: [{interactions}] is below users * min_per_user = {users * min_per_user}")
    weights = rng.lognormal(0.0, sigma, users)
    extra = interactions - users * min_per_user
    counts = min_per_user + np.floor(weights / weights.sum() * extra).astype(np.int64)
    counts[np.argsort(-weights)[: interactions - counts.sum()]] += 1  # the rounding remainder to the heaviest
    return counts


def interactions(users, total, items, min_per_user=20, sigma=1.2, seed=0, favourites=0, repeat=0.0):
    """``(user, item, timestamp)`` arrays (ids from 1), grouped by user in time order.

    With ``favourites`` > 0 every user also has that many favourite items of their own, drawn uniformly from the
    catalogue (so no other user's data predicts them), and each interaction is a re-consumption of one of them with
    probability ``repeat``: a persistent personal taste that reaches further back than a model's input window.
    """
    rng = np.random.default_rng(seed)
    counts = activity(users, total, min_per_user, sigma, rng)
    user = np.repeat(np.arange(1, users + 1), counts)
    position = np.arange(len(user)) - np.repeat(np.cumsum(counts) - counts, counts)
    popularity = 1.0 / np.arange(1, items + 1) ** 0.8
    popular = rng.choice(items, size=len(user), p=popularity / popularity.sum())
    taste = rng.integers(0, items, users)[user - 1]
    drift = (taste + position // 3 + rng.integers(0, 8, len(user))) % items
    item = np.where(rng.random(len(user)) < 0.5, drift, popular) + 1
    if favourites:
        own = rng.integers(0, items, (users, favourites))[user - 1, rng.integers(0, favourites, len(user))]
        item = np.where(rng.random(len(user)) < repeat, own + 1, item)
    timestamp = 10**9 + user.astype(np.int64) * 10**4 + position
    return user, item, timestamp


def write_atomic(folder, name, user, item, timestamp):
    """``folder/name/name.inter`` in RecBole's atomic format."""
    path = os.path.join(folder, name)
    os.makedirs(path, exist_ok=True)
    file_name = os.path.join(path, f"{name}.inter")
    table = np.stack([user, item, timestamp], axis=1)
    with open(file_name, "w") as file:
        file.write("user_id:token\titem_id:token\ttimestamp:float\n")
        np.savetxt(file, table, fmt="%d", delimiter="\t")
    return file_name


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder to write <name>/<name>.inter under")
    parser.add_argument("--name", default="synthetic")
    parser.add_argument("--users", type=int, default=6040)
    parser.add_argument("--interactions", type=int, default=1_000_000)
    parser.add_argument("--items", type=int, default=3706)
    parser.add_argument("--min_per_user", type=int, default=20)
    parser.add_argument("--sigma", type=float, default=1.2, help="log-normal spread of user activity")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--favourites", type=int, default=0, help="favourite items of each user's own (0: none)")
    parser.add_argument("--repeat", type=float, default=0.0, help="probability that an interaction is a favourite")
    args = parser.parse_args()
    arrays = interactions(
        args.users, args.interactions, args.items, args.min_per_user, args.sigma, args.seed, args.favourites, args.repeat
    )
    print(write_atomic(args.out, args.name, *arrays))


if __name__ == "__main__":
    main()
