"""Kademlia lookup hops against network size, on the pure model in swarm_node/dht/kademlia_sim.py.

Prints one JSON line per size: hops (rounds of alpha parallel queries until the k closest known
nodes have all answered), hops_to_closest (rounds until the true closest node was first learned),
queries per lookup, how often the lookup found the true closest node / all k closest, and log2(N).
A last line fits hops_to_closest = a * log2(N) + b over the sizes.

    .venv/bin/python scripts/sim_dht.py [--sizes 100,300,1000,3000,10000] [--lookups 200] [--k 20]
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import time

from swarm_node.dht.kademlia_sim import ALPHA, K, Network


def run_size(n: int, *, lookups: int, k: int, alpha: int, seed: int) -> dict[str, object]:
    t0 = time.perf_counter()
    net = Network(n, seed=seed, k=k)
    rng = random.Random(seed + 1)
    hops: list[int] = []
    to_closest: list[int] = []
    queries: list[int] = []
    found_closest = found_all_k = 0
    for _ in range(lookups):
        source = rng.choice(net.ids)
        target = rng.getrandbits(256)
        result = net.lookup(source, target, alpha=alpha)
        truth = net.true_closest(target, k)
        hops.append(result.hops)
        to_closest.append(result.hops_to_closest)
        queries.append(result.queries)
        found_closest += result.closest[0] == truth[0]
        found_all_k += result.closest == truth
    return {
        "nodes": n,
        "log2_n": round(math.log2(n), 2),
        "k": k,
        "alpha": alpha,
        "lookups": lookups,
        "mean_hops": round(statistics.mean(hops), 2),
        "max_hops": max(hops),
        "mean_hops_to_closest": round(statistics.mean(to_closest), 2),
        "max_hops_to_closest": max(to_closest),
        "mean_queries": round(statistics.mean(queries), 1),
        "found_closest": round(found_closest / lookups, 3),
        "found_all_k": round(found_all_k / lookups, 3),
        "seconds": round(time.perf_counter() - t0, 2),
    }


def fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    mx, my = statistics.mean(xs), statistics.mean(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum(
        (x - mx) ** 2 for x in xs
    )
    return slope, my - slope * mx


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="100,300,1000,3000,10000")
    parser.add_argument("--lookups", type=int, default=200)
    parser.add_argument("--k", type=int, default=K)
    parser.add_argument("--alpha", type=int, default=ALPHA)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rows = []
    for n in (int(s) for s in args.sizes.split(",")):
        row = run_size(n, lookups=args.lookups, k=args.k, alpha=args.alpha, seed=args.seed)
        rows.append(row)
        print(json.dumps(row), flush=True)
    if len(rows) >= 2:
        xs = [math.log2(float(r["nodes"])) for r in rows]  # type: ignore[arg-type]
        for name in ("mean_hops_to_closest", "mean_hops"):
            slope, intercept = fit(xs, [float(r[name]) for r in rows])  # type: ignore[arg-type]
            print(
                json.dumps(
                    {
                        "fit": f"{name} = a * log2(N) + b",
                        "a": round(slope, 3),
                        "b": round(intercept, 2),
                    }
                )
            )


if __name__ == "__main__":
    main()
