"""Search strategies over a discrete config space, independent of kernels and timers.

An objective maps a config to its time in ms (lower is better) or None when the config cannot run
(failed to compile or run, or gave a wrong result). Each call is one measurement.

- `exhaustive`: every config, in order.
- `budgeted`: random sampling, then a cost model: a quadratic fit of log(time) over the normalized
  parameter ranks picks each next config (the unmeasured one it predicts fastest; with `batch` > 1
  the `batch` configs it predicts fastest, measured before the next fit); a quarter of the picks
  are instead the best config's neighbours the model ranks first, and only local moves are made
  while too few configs have run to fit it. It stops after
  `max_measurements` (default: a quarter of the space). On launch-config landscapes (smooth in log
  block size, with interactions, holes where configs were pruned or failed) it reaches the exhaustive
  winner's speed within 5% with a quarter of the measurements (tests/test_autotune.py checks this on
  synthetic landscapes).

Both take `prepare(configs)`, called with each group of configs about to be measured (the seed
sample, each model step's batch, each chunk of the exhaustive list): the tuner uses it to compile a
batch in parallel worker processes before timing it one config at a time (compile_pool.py).
"""
from __future__ import annotations

import random
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

from .database import config_key

Config = dict[str, Any]
Objective = Callable[[Config], Optional[float]]
Prepare = Callable[[list[Config]], None]

STRATEGIES = ("exhaustive", "budgeted")


def default_budget(n_configs: int) -> int:
    """Measurements the budgeted search may spend on a space of n configs: a quarter, at least min(n, 4)."""
    return max(min(n_configs, 4), n_configs // 4)


def _sort_values(values: Iterable[Any]) -> list[Any]:
    vals = list({repr(v): v for v in values}.values())  # by repr, as ranks are: True and 1 are two values
    try:
        return sorted(vals)
    except TypeError:
        return sorted(vals, key=repr)


class ConfigSpace:
    """A list of configs indexed by parameter values, for neighbourhood moves."""

    def __init__(self, configs: Sequence[Mapping[str, Any]]):
        # a config listed twice is one config (measured once, counted once against a budget)
        self.configs = [dict(c) for c in {config_key(c): c for c in configs}.values()]
        self.keys = [config_key(c) for c in self.configs]
        self.index = {k: i for i, k in enumerate(self.keys)}
        params = sorted({p for c in self.configs for p in c})
        self.params = params
        self.values = {p: _sort_values(c[p] for c in self.configs if p in c) for p in params}
        rank = {p: {repr(v): n for n, v in enumerate(vals)} for p, vals in self.values.items()}
        # rank of each config's value along each parameter (-1: the config lacks the parameter)
        self.ranks = [tuple(rank[p][repr(c[p])] if p in c else -1 for p in params) for c in self.configs]
        self._dir_cache: dict[int, list[list[int]]] = {}

    def __len__(self) -> int:
        return len(self.configs)

    def _directions(self, i: int) -> list[list[int]]:
        """For config i, per (parameter, direction): the configs moving that way, nearest first."""
        if i not in self._dir_cache:
            base = self.ranks[i]
            lists = []
            for p in range(len(self.params)):
                if base[p] < 0:
                    continue
                up, down = [], []
                for j, r in enumerate(self.ranks):
                    if r[p] < 0 or r[p] == base[p]:
                        continue
                    key = (abs(r[p] - base[p]), sum(abs(a - b) for a, b in zip(r, base)), j)
                    (up if r[p] > base[p] else down).append(key)
                lists += [[j for *_, j in sorted(up)], [j for *_, j in sorted(down)]]
            self._dir_cache[i] = lists
        return self._dir_cache[i]

    def neighbours(self, i: int, skip: frozenset[int] | set[int] = frozenset()) -> list[int]:
        """For each parameter and direction, the nearest config that moves that parameter that way.

        "Nearest": fewest steps along the parameter, then fewest steps in all parameters; in a full
        product space this is the config one step away with everything else equal. Configs in
        `skip` (e.g. those that failed) count as absent, so a search steps over them.
        """
        out: list[int] = []
        for ordered in self._directions(i):
            j = next((j for j in ordered if j not in skip), None)
            if j is not None and j not in out:
                out.append(j)
        return out


def exhaustive(configs: Sequence[Config], objective: Objective, *,
               should_stop: Optional[Callable[[], bool]] = None, prepare: Optional[Prepare] = None,
               batch: int = 1) -> dict[str, Optional[float]]:
    """Measure every config; returns {config_key: time or None}. Stops early when should_stop().
    With `prepare`, each chunk of `batch` configs is prepared before it is measured."""
    seen: dict[str, Optional[float]] = {}
    unique = list({config_key(c): c for c in configs}.values())
    step = max(1, int(batch))
    for c0 in range(0, len(unique), step):
        chunk = unique[c0:c0 + step]
        if prepare is not None and not (should_stop is not None and should_stop()):
            prepare(chunk)
        for cfg in chunk:
            if should_stop is not None and should_stop():
                return seen
            seen[config_key(cfg)] = objective(cfg)
    return seen


def _features(space: ConfigSpace):
    """Quadratic features of each config in normalized parameter ranks (0..1): 1, x, x^2, x_p x_q."""
    import numpy as np

    ranks = np.array(space.ranks, dtype=float).reshape(len(space), len(space.params))
    steps = np.array([max(len(space.values[p]) - 1, 1) for p in space.params], dtype=float)
    x = np.where(ranks < 0, 0.5, ranks / steps)
    n_params = x.shape[1]
    cols = [np.ones(len(x))] + [x[:, p] for p in range(n_params)] + [x[:, p] ** 2 for p in range(n_params)]
    cols += [x[:, p] * x[:, q] for p in range(n_params) for q in range(p + 1, n_params)]
    return np.stack(cols, axis=1)


def budgeted(configs: Sequence[Config], objective: Objective, *, max_measurements: Optional[int] = None,
             start: Iterable[Config] = (), seed: int = 0,
             should_stop: Optional[Callable[[], bool]] = None, prepare: Optional[Prepare] = None,
             batch: int = 1) -> dict[str, Optional[float]]:
    """Model-guided search with at most `max_measurements` objective calls (default_budget(n)).

    1. Measure the `start` configs found in the space and a random sample (about 2 per parameter,
       at most a third of the budget).
    2. Then, each step, fit a quadratic cost model of log(time) in the normalized parameter ranks
       (ridge least squares over the configs that ran) and measure the unmeasured config it predicts
       fastest; every fourth step, the best config's unmeasured neighbour it ranks first. Its picks
       move toward the fast region and then refine around the best found so far.
    3. Until three configs have run, there is no model: measure the neighbours of the best config
       (one step per parameter either way), or a random config when none has run yet.
    Failed configs (objective None) are never retried and stay out of the model. With `batch` > 1,
    step 2 measures `batch` configs per fit, and `prepare` sees each group first: a quarter of them
    the best config's neighbours that the model ranks first, the rest its fastest predictions.
    """
    import numpy as np

    space = ConfigSpace(configs)
    n = len(space)
    if n == 0:
        return {}
    budget = min(n, default_budget(n) if max_measurements is None else max(1, int(max_measurements)))
    rng = random.Random(seed)
    results: dict[int, Optional[float]] = {}
    expanded: set[int] = set()
    fits = 0

    def stopped() -> bool:
        return len(results) >= budget or (should_stop is not None and should_stop())

    def measure(i: int) -> None:
        if i not in results and not stopped():
            results[i] = objective(space.configs[i])

    def measure_all(group: list[int]) -> None:
        group = [i for i in dict.fromkeys(group) if i not in results][:max(0, budget - len(results))]
        if prepare is not None and group and not stopped():
            prepare([space.configs[i] for i in group])
        for i in group:
            measure(i)

    order = list(range(n))
    rng.shuffle(order)
    seeds = [space.index[k] for k in (config_key(c) for c in start) if k in space.index]
    n_random = max(2, min(budget // 3, 2 * len(space.params) + 1))
    seeds += [i for i in order if i not in seeds][:n_random]
    measure_all(seeds)

    features = _features(space)
    ridge = 1e-2 * np.eye(features.shape[1])
    while not stopped():
        ran = [(t, i) for i, t in results.items() if t is not None]
        unmeasured = [i for i in order if i not in results]
        if not unmeasured:
            break
        if len(ran) >= 3:
            idx = np.array([i for _, i in ran])
            a = features[idx]
            y = np.log(np.maximum([t for t, _ in ran], 1e-12))
            w = np.linalg.solve(a.T @ a + ridge, a.T @ y)
            cand = np.array(unmeasured)
            picks = [int(i) for i in cand[np.argsort(features[cand] @ w, kind="stable")]]
            take = max(1, int(batch))
            fits += 1
            if take > 1 or fits % 4 == 0:
                # a quarter of the picks step from the best config so far (the neighbours the model
                # ranks first): the model's picks alone can all follow one wrong extrapolation (say
                # num_warps=8 everywhere because every sample with 4 was poor elsewhere) or stop two
                # steps from the winner (one per fit: 6 route landscapes in 10,000 ended below 0.95)
                failed = {k for k, t in results.items() if t is None}
                near = set(space.neighbours(min(ran)[1], failed))
                local = [i for i in picks if i in near][:max(1, take // 4)]
                picks = local + [i for i in picks if i not in local]
            measure_all(picks[:take])
            continue
        best = min(((t, i) for t, i in ran if i not in expanded), default=None)
        fresh = []
        if best is not None:
            expanded.add(best[1])
            failed = {k for k, t in results.items() if t is None}
            fresh = [j for j in space.neighbours(best[1], failed) if j not in results]
        measure_all(fresh or unmeasured[:1])
    return {space.keys[i]: t for i, t in results.items()}


def run_strategy(strategy: str, configs: Sequence[Config], objective: Objective, *,
                 max_measurements: Optional[int] = None, start: Iterable[Config] = (), seed: int = 0,
                 should_stop: Optional[Callable[[], bool]] = None, prepare: Optional[Prepare] = None,
                 batch: int = 1) -> dict[str, Optional[float]]:
    """Dispatch on the strategy name ("exhaustive" honours max_measurements as a plain cap)."""
    if strategy == "exhaustive":
        capped = list(configs) if max_measurements is None else list(configs)[:max(1, int(max_measurements))]
        return exhaustive(capped, objective, should_stop=should_stop, prepare=prepare, batch=batch)
    if strategy == "budgeted":
        return budgeted(configs, objective, max_measurements=max_measurements, start=start, seed=seed,
                        should_stop=should_stop, prepare=prepare, batch=batch)
    raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
