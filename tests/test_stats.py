"""Student's t, Welch's t-test and the significance columns of ``qexp table``, against values computed by
hand (worked example below) and textbook quantiles; SciPy, where installed, checks a wider grid."""

from __future__ import annotations

import csv
import io
import math
import random
from pathlib import Path

import pytest

from qexp.cli import main as qexp
from qexp.report import stats
from tests.test_results import make_run, md_rows, render

# t_{0.975, df}: the two-sided 95% quantiles printed in every statistics textbook
T975 = {1: 12.7062, 2: 4.3027, 4: 2.7764, 10: 2.2281, 30: 2.0423}


@pytest.mark.parametrize("df,q", sorted(T975.items()))
def test_t_quantiles_match_the_textbook(df: int, q: float) -> None:
    assert stats.t_ppf(0.975, df) == pytest.approx(q, abs=1e-4)
    assert stats.t_ppf(0.025, df) == pytest.approx(-q, abs=1e-4)
    assert stats.t_cdf(stats.t_ppf(0.975, df), df) == pytest.approx(0.975, abs=1e-12)


def test_t_tail_and_large_df_limit() -> None:
    # t = 2 with 5 df: two-sided p = 0.1019 (tables); t with df -> inf tends to the normal's 1.95996
    assert 2 * stats.t_sf(2.0, 5) == pytest.approx(0.10194, abs=1e-5)
    assert stats.t_ppf(0.975, 1e7) == pytest.approx(1.959964, abs=1e-5)
    assert stats.t_cdf(0.0, 3.7) == pytest.approx(0.5)
    # df = 1 is the Cauchy distribution: P(T > t) = 1/2 - atan(t)/pi
    for t in (-3.0, 0.4, 7.0):
        assert stats.t_sf(t, 1) == pytest.approx(0.5 - math.atan(t) / math.pi, abs=1e-12)


def test_welch_worked_example() -> None:
    """a = [2.0, 3.0, 2.4], b = [1.0, 1.2, 1.4] by hand: means 2.4667 and 1.2, variances 0.25333 and 0.04,
    se^2 = 0.25333/3 + 0.04/3 = 0.097778, t = 1.26667 / 0.312694 = 4.0508,
    df = 0.097778^2 / (0.084444^2/2 + 0.013333^2/2) = 2.6162, p = 2 P(T_2.6162 > 4.0508) = 0.0349,
    CI = 1.26667 ± t_{0.975, 2.6162} * 0.312694 = [0.1836, 2.3497]."""
    w = stats.welch([2.0, 3.0, 2.4], [1.0, 1.2, 1.4])
    assert w.diff == pytest.approx(1.26667, abs=1e-5)
    assert w.t == pytest.approx(4.0508, abs=1e-4)
    assert w.df == pytest.approx(2.6162, abs=1e-4)
    assert w.p == pytest.approx(0.03493, abs=1e-5)
    assert (w.lo, w.hi) == (pytest.approx(0.18363, abs=1e-5), pytest.approx(2.34970, abs=1e-5))
    back = stats.welch([1.0, 1.2, 1.4], [2.0, 3.0, 2.4])
    assert back.diff == -w.diff and back.p == pytest.approx(w.p) and back.lo == pytest.approx(-w.hi)
    assert stats.welch([1.0], [2.0, 3.0]) is None  # no variance estimate from one seed
    exact = stats.welch([1.0, 1.0], [2.0, 2.0])  # deterministic runs: the difference is exact
    assert exact.p == 0.0 and exact.lo == exact.hi == -1.0
    assert stats.welch([1.0, 1.0], [1.0, 1.0]).p == 1.0


def test_mean_ci_half_width() -> None:
    # [1.0, 1.2, 1.4]: std 0.2, n 3 -> 4.3027 * 0.2 / sqrt(3) = 0.49683
    assert stats.mean_ci([1.0, 1.2, 1.4]) == pytest.approx(0.49683, abs=1e-5)
    assert stats.mean_ci([1.0]) is None


def test_against_scipy_where_installed() -> None:
    sp = pytest.importorskip("scipy.stats")
    rng = random.Random(0)
    for _ in range(40):
        df = rng.uniform(0.5, 80)
        q = rng.uniform(0.001, 0.999)
        assert stats.t_ppf(q, df) == pytest.approx(float(sp.t.ppf(q, df)), rel=1e-9, abs=1e-9)
        a = [rng.gauss(0, 1) for _ in range(rng.randint(2, 8))]
        b = [rng.gauss(0.5, 2) for _ in range(rng.randint(2, 8))]
        ref = sp.ttest_ind(a, b, equal_var=False)
        w = stats.welch(a, b)
        assert w.p == pytest.approx(float(ref.pvalue), rel=1e-8, abs=1e-12)
        ci = ref.confidence_interval(0.95)
        assert (w.lo, w.hi) == (pytest.approx(float(ci.low), rel=1e-8), pytest.approx(float(ci.high), rel=1e-8))


# ---- qexp table --------------------------------------------------------------------------------
@pytest.fixture()
def two_methods(tmp_path: Path) -> Path:
    """float [1.0, 1.2, 1.4] vs bc [2.0, 3.0, 2.4] (the worked example), bc 2 bits [1.5] (one seed)."""
    root = tmp_path / "out"
    for seed, (f, b) in enumerate(zip([1.0, 1.2, 1.4], [2.0, 3.0, 2.4])):
        make_run(root, "float", 32, seed, [f])
        make_run(root, "bc", 1, seed, [b])
    return root


def test_best_is_marked_only_when_significant(two_methods: Path) -> None:
    md = render(two_methods, "md")
    assert "**1.20 ± 0.20 (3)**" in md  # p = 0.035 < 0.05
    assert "only where Welch's t-test over seeds finds it better than the runner-up at p < 0.05" in md
    strict = render(two_methods, "md", "--alpha", "0.01")
    assert "**" not in strict.split("\n", 1)[1]
    assert "mnist/lenet5: best mean float/32 not marked, not significantly better than bc/1 (p=0.035 ≥ 0.01)" \
        in strict
    make_run(two_methods, "bc", 2, 0, [1.5])  # runner-up with one seed: untestable, unmarked
    assert "**" not in render(two_methods, "md").split("\n", 1)[1]


def test_baseline_adds_difference_ci_and_p(two_methods: Path) -> None:
    rows = md_rows(render(two_methods, "md", "--baseline", "method=float"))
    assert rows[2] == ["float", "32", "**1.20 ± 0.20 (3); baseline**"]
    assert rows[3] == ["bc", "1", "2.47 ± 0.50 (3); Δ +1.27 [+0.18, +2.35] p=0.035"]
    out = csv.DictReader(io.StringIO(render(two_methods, "csv", "--baseline", "method=bc,bits=1", "--ci")))
    f = next(out)
    assert float(f["mnist/lenet5 vs baseline"]) == pytest.approx(-1.26667, abs=1e-5)
    assert float(f["mnist/lenet5 vs baseline lo"]) == pytest.approx(-2.34970, abs=1e-5)
    assert float(f["mnist/lenet5 vs baseline p"]) == pytest.approx(0.03493, abs=1e-5)
    assert float(f["mnist/lenet5 ci95"]) == pytest.approx(0.49683, abs=1e-5)


def test_ci_replaces_std(two_methods: Path) -> None:
    md = render(two_methods, "md", "--ci")
    assert "mean ± 95% CI of the mean (n)" in md and "1.20 ± 0.50 (3)" in md


@pytest.mark.parametrize("args,message", [
    (["--baseline", "method=nosuch"], "--baseline method=nosuch matches no row; the rows are float/32, bc/1"),
    (["--baseline", "seed=0"], "--baseline key 'seed' is not a row key; the rows are method,bits"),
    (["--baseline", "method"], "--baseline takes KEY=VALUE"),
    (["--alpha", "0"], "--alpha must be in (0, 1]"),
])
def test_bad_significance_options_are_one_line(two_methods: Path, args: list[str], message: str,
                                                capsys: pytest.CaptureFixture) -> None:
    assert qexp(["table", str(two_methods), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_ambiguous_baseline_names_the_missing_key(two_methods: Path, capsys: pytest.CaptureFixture) -> None:
    make_run(two_methods, "bc", 2, 0, [1.5])
    assert qexp(["table", str(two_methods), "--baseline", "method=bc"]) == 2
    assert "matches 2 rows (bc/1, bc/2); add bits=VALUE to pick one" in capsys.readouterr().err
