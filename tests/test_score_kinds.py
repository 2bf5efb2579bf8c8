"""Score kinds: a task says whether its scores are binary or continuous, a test says which it
accepts; the default tests follow the task, a named list wins, a mismatch is refused by name."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import wilcoxon

from framework.interfaces import ConfigError, Task
from framework.registry import get_registry
from framework.runner.stat_choice import choose_stats


class Recall(Task):
    name = "recall_task"
    score_kind = "continuous"

    def build_samples(self, tokenizer, split, seed):
        return []

    def score(self, sample, output):
        return 0.5


class Exact(Recall):
    name = "exact_task"
    score_kind = "binary"


def stats_of(compose_config, task: Task, *overrides: str) -> list[str]:
    return list(choose_stats(compose_config(*overrides)["stats"], task, get_registry()))


def test_the_default_tests_follow_the_score_kind(compose_config):
    assert stats_of(compose_config, Exact()) == ["mcnemar", "permutation"]
    assert stats_of(compose_config, Recall()) == ["permutation", "bootstrap", "wilcoxon"]
    assert stats_of(compose_config, Recall(), "stats=[auto,cohens_d]") == ["permutation", "bootstrap", "wilcoxon", "cohens_d"]


def test_a_named_list_wins(compose_config):
    assert stats_of(compose_config, Recall(), "stats=[wilcoxon]") == ["wilcoxon"]
    assert stats_of(compose_config, Exact(), "stats=[mcnemar,wilcoxon]") == ["mcnemar", "wilcoxon"]


def test_a_test_that_does_not_fit_the_scores_is_refused_naming_task_test_and_alternatives(compose_config):
    with pytest.raises(ConfigError) as refused:
        stats_of(compose_config, Recall(), "stats=[permutation,mcnemar]")
    message = str(refused.value)
    assert "'mcnemar' accepts only binary scores" in message and "task 'recall_task'" in message
    assert "continuous" in message and "bootstrap" in message and "wilcoxon" in message and "mcnemar," not in message


def test_an_unknown_score_kind_is_refused(compose_config):
    task = Recall()
    task.score_kind = "ordinal"
    with pytest.raises(ConfigError, match="score_kind='ordinal'"):
        stats_of(compose_config, task)


def test_every_installed_test_declares_what_it_accepts():
    registry = get_registry()
    accepts = {name: registry.get("stats", name).cls.accepts for name in registry.names("stats")}
    assert accepts["mcnemar"] == {"binary"}
    assert {"binary", "continuous"} <= accepts["wilcoxon"] & accepts["permutation"] & accepts["bootstrap"]


def test_wilcoxon_matches_scipy_and_the_exact_count():
    test = get_registry().create("stats", {"name": "wilcoxon"})
    rng = np.random.default_rng(0)
    treatment, reference = rng.uniform(size=12), rng.uniform(size=12)
    result = test.compare(treatment, reference)
    assert result["p_value"] == pytest.approx(wilcoxon(treatment - reference).pvalue)
    assert result["effect_size"] == pytest.approx((treatment - reference).mean())
    better = test.compare(np.full(6, 0.9) - np.arange(6) / 100, np.full(6, 0.1))
    assert better["p_value"] == pytest.approx(2 / 2**6)  # all six differences positive: 2 of 64 sign patterns
    assert better["rank_biserial"] == 1.0
    assert test.compare(np.ones(4), np.ones(4)) == {"effect_size": 0.0, "p_value": 1.0}
    with pytest.raises(ConfigError, match="zero_method='nope'"):
        get_registry().create("stats", {"name": "wilcoxon", "zero_method": "nope"})
