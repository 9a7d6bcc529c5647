"""A small but real analysis, as nbindustria runs it: simulate sensor readings for several
sites, clean them, fit trend models of several degrees per site, and summarize the best fits.

Run it twice: the second run finds every result in the cache. Edit `clean` (say, the outlier
threshold) and run again: exactly the cleaning, the fits and the summary run again; the
simulations stay cached.
"""

from __future__ import annotations

import numpy as np

from nbindustria import Pipeline

pipe = Pipeline(name="sensor-trends", engines="auto")

OUTLIER_SIGMA = 3.0  # a global constant the cleaning step reads: part of its key


@pipe.task
def simulate(site: str, days: int = 365, seed: int = 0) -> np.ndarray:
    """Daily readings of one site: a trend, a yearly cycle, noise and a few spikes."""
    rng = np.random.default_rng([seed, sum(map(ord, site))])
    t = np.arange(days, dtype=float)
    signal = 0.01 * t + 2.0 * np.sin(2 * np.pi * t / 365.0) + rng.normal(0, 0.5, days)
    spikes = rng.choice(days, size=days // 50, replace=False)
    signal[spikes] += rng.normal(0, 8, spikes.size)
    return np.stack([t, signal])


def robust_mask(values: np.ndarray) -> np.ndarray:
    median = np.median(values)
    mad = np.median(np.abs(values - median)) * 1.4826
    return np.abs(values - median) < OUTLIER_SIGMA * mad


@pipe.task
def clean(readings: np.ndarray) -> np.ndarray:
    """Drop spikes further than OUTLIER_SIGMA robust deviations from the median."""
    return readings[:, robust_mask(readings[1])]


@pipe.task(cpus=1)
def fit(readings: np.ndarray, degree: int) -> dict[str, float]:
    """A least-squares polynomial trend and its residual error."""
    t, y = readings
    coeffs = np.polyfit(t, y, degree)
    residual = float(np.sqrt(np.mean((np.polyval(coeffs, t) - y) ** 2)))
    return {"degree": degree, "rmse": residual, "slope_per_year": float(coeffs[-2] * 365)}


@pipe.task
def summarize(fits: dict[str, list[dict[str, float]]]) -> list[tuple[str, int, float]]:
    """The best degree per site, by residual error."""
    return [(site, int(best["degree"]), round(best["rmse"], 4))
            for site, options in sorted(fits.items())
            for best in [min(options, key=lambda f: f["rmse"])]]


if __name__ == "__main__":
    sites = ["north", "south", "east", "west"]
    cleaned = {site: clean(simulate(site)) for site in sites}
    fits = {site: [fit(cleaned[site], degree=d) for d in (1, 2, 3)] for site in sites}
    best = summarize(fits)
    summary = pipe.run()
    print()
    for site, degree, rmse in best.result():
        print(f"{site:>6}: best trend degree {degree} (rmse {rmse})")
    print(summary.line())
