"""Experiments from Python and notebooks: the command line's runs, composed and run in process,
their results as data and figures, a model loaded once for many runs, and past runs read back.

:func:`run` composes with Hydra's compose API on the command line's ``conf/`` and its ``config``,
and runs :func:`framework.runner.pipeline.run` on the result, exactly as ``python -m framework``
does: the same validation, the same MLflow run (tags, params, artifacts, final state). Its
:class:`Result` is read back from the store, so :func:`load_run` on the same run gives an equal one.
The public names are re-exported, lazily, by ``framework`` (``framework.run``, ``framework.load_run``...).
"""

from __future__ import annotations

import io
import json
import os
import tempfile
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import matplotlib.image
import mlflow
import numpy as np
import pandas as pd
import torch
import yaml
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from hydra.initialize import get_gh_backup, restore_gh_from_backup
from matplotlib.figure import Figure
from mlflow.exceptions import MlflowException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from framework import plots
from framework.interfaces import BASELINE, ConfigError, HeadScores, LoadedModel, Sample
from framework.model import loading
from framework.planning.planner import check_context_lengths
from framework.registry import get_registry
from framework.runner import pipeline, validation
from framework.tracking.experiments import local_tracking_uri, run_address
from framework.tracking.stores import is_server
from framework.tracking.sweep import REDO

CONFIG_DIR = Path(__file__).resolve().parent.parent / "conf"  # the command line's config_path="../conf"
CONFIG_NAME = "config"
DEFAULT_EXPERIMENT = "retrieval-heads"
# the overrides each model from load_model() was composed with (by its torch module), so that
# run(model=...) and detect() compose the same model config
_LOADED_WITH: weakref.WeakKeyDictionary[torch.nn.Module, tuple[str, ...]] = weakref.WeakKeyDictionary()


def compose(*overrides: str) -> dict[str, Any]:
    """The resolved config ``python -m framework <overrides>`` runs, as plain containers.

    Hydra's own state (an initialised ``GlobalHydra``, e.g. from a ``hydra.initialize`` of the
    caller's) is set aside for the composition and restored after it. An override Hydra refuses
    (an unknown option, a typo in a key, a syntax error) raises :class:`ConfigError` with Hydra's
    message, the one the command line prints: for an unknown plugin it lists the available ones.
    """
    backup = get_gh_backup()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3", job_name="framework"):
            composed = hydra_compose(CONFIG_NAME, overrides=list(overrides))
        config = OmegaConf.to_container(composed, resolve=True)
    except (HydraException, OmegaConfBaseException) as error:
        raise ConfigError(str(error)) from None
    finally:
        restore_gh_from_backup(backup)
    config.pop(REDO, None)  # a sweep's flag, popped by the command line before it runs a job
    return config


def load_model(name: str = "smollm2_135m", *overrides: str) -> LoadedModel:
    """The model of the ``model`` config group's option ``name``, loaded as a run loads it, with
    overrides of its keys as on the command line (``"model.dtype=bfloat16"``); pass it to
    :func:`run` and :func:`detect` to load it once for many runs."""
    spec = compose(f"model={name}", *overrides)["model"]
    validation.check_model_device(spec)
    loaded = loading.load_model(spec)
    _LOADED_WITH[loaded.model] = (f"model={name}", *overrides)
    return loaded


def _group(override: str) -> str:
    try:
        return OverridesParser.create().parse_overrides([override])[0].key_or_group
    except HydraException:
        return ""  # not an override: compose() reports it as the command line does


def _with_model(overrides: Sequence[str], model: LoadedModel | None) -> list[str]:
    """The overrides, led by those that compose ``model``'s config unless they choose a model."""
    if model is None or any(_group(o) == "model" for o in overrides):
        return list(overrides)
    return [*_LOADED_WITH.get(model.model, (f"model={model.info.name}",)), *overrides]


def _check_model(spec: dict[str, Any], model: LoadedModel) -> None:
    """The run's params and tags must describe the model it runs on: same config, device, dtype."""
    device = loading.resolve_device(spec.get("device", "auto"))
    wanted = (spec["name"], device.type, loading.resolve_dtype(spec.get("dtype", "auto"), device))
    loaded = (model.info.name, model.device.type, model.model.dtype)
    if wanted != loaded:
        raise ConfigError(f"model= is {loaded[0]} on {loaded[1]} in {loaded[2]}, the config's model is {wanted[0]} on "
                          f"{wanted[1]} in {wanted[2]}: pass the overrides the model was loaded with, or drop model=")


@contextmanager
def _own_figures() -> Iterator[None]:
    """Close the pyplot figures a run made for its artifacts: in Jupyter's inline backend they
    would all be drawn under the cell, and kept open they pile up over many runs."""
    plt = plots.plt
    before = set(plt.get_fignums())
    try:
        yield
    finally:
        for number in set(plt.get_fignums()) - before:
            plt.close(number)


def run(*overrides: str, model: LoadedModel | None = None) -> Result | None:
    """Compose, validate and run one job as ``python -m framework <overrides>`` does, and return
    its :class:`Result`; with ``model`` (from :func:`load_model`) the run uses that model instead
    of loading one. ``dry_run=true`` prints the plan and returns None, as the command prints it.

    A refused config raises :class:`ConfigError` before any run is created; a run that fails ends
    FAILED and an interrupted one (the notebook's stop button, Ctrl-C) KILLED, keeping what it logged.
    """
    if mlflow.active_run() is not None:
        raise ConfigError(f"MLflow run {mlflow.active_run().info.run_id} is active: end it first "
                          "(mlflow.end_run()); framework.run opens a run of its own")
    config = compose(*_with_model(overrides, model))
    if model is not None:
        validation.validate(config)  # an impossible device or dtype is named as such, not as a mismatch
        _check_model(config["model"], model)
    with _own_figures():
        context = pipeline.run(config, loaded=model)
    return load_run(context.run_id) if context.run_id else None


def detect(model: LoadedModel, detector: str, *overrides: str) -> Detection:
    """A detector's scores on ``model``, computed in memory without an MLflow run, on the
    detection samples a run with the same overrides would build (the task's ``detect`` split,
    drawn with ``detect_seed``); e.g. ``detect(model, "attn_mass", "detector.top_k=10")``."""
    config = compose(*_with_model([f"+detector={detector}", *overrides], model))
    validation.validate(config)
    _check_model(config["model"], model)
    registry = get_registry()
    task = registry.create("task", config["task"])
    plugin = registry.create("detector", config["detector"])
    plugin.validate(model.info)
    check_context_lengths(config, model.model.config)
    samples = task.build_samples(model.tokenizer, "detect", config["detect_seed"])
    return Detection(plugin.detect(model, samples), samples)


def head_table(detector: str, scores: np.ndarray, selected: Sequence[Sequence[int]]) -> pd.DataFrame:
    """One row per (layer, head): its score and whether the detector selected it."""
    layers, heads = np.indices(scores.shape)
    chosen = {tuple(map(int, h)) for h in selected}
    return pd.DataFrame({"detector": detector, "layer": layers.ravel(), "head": heads.ravel(), "score": scores.ravel(),
                         "selected": [(int(l), int(h)) in chosen for l, h in zip(layers.ravel(), heads.ravel())]})


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def _display(summary: str, figures: dict[str, Figure]) -> None:
    """A summary, then each figure as a PNG output of its own (which GitHub's notebook view shows too)."""
    from IPython.display import HTML, Image, display

    display(HTML(summary))
    for path, figure in figures.items():
        display(HTML(f"<code>{path}</code>"), Image(data=_png(figure), format="png"))


@dataclass
class Detection:
    """A detector's result on a model in memory: ``scores`` [layers x heads], ``selected`` heads,
    ``extra`` results, and the same as a table; shown in Jupyter as its heatmap."""

    head_scores: HeadScores
    samples: list[Sample] = field(repr=False)

    @property
    def scores(self) -> np.ndarray:
        return self.head_scores.scores

    @property
    def selected(self) -> list[tuple[int, int]]:
        return self.head_scores.selected

    @property
    def extra(self) -> dict[str, Any]:
        return self.head_scores.extra

    @property
    def table(self) -> pd.DataFrame:
        """Columns detector, layer, head, score, selected, as :attr:`Result.head_scores`."""
        return head_table(self.head_scores.detector, self.scores, self.selected)

    def heatmap(self) -> Figure:
        """The heatmap a run logs for its detector: score per layer and head, selected outlined."""
        figure = plots.head_score_heatmap(self.scores, self.selected, self.head_scores.detector)
        plots.plt.close(figure)  # kept by the caller, not by pyplot
        return figure

    def _ipython_display_(self) -> None:
        _display(f"<p>{self.head_scores.detector} on {len(self.samples)} detection samples: {len(self.selected)} of "
                 f"{self.scores.size} heads selected</p>", {"heatmap": self.heatmap()})


@dataclass
class Result:
    """One run as data, read from the store (:func:`run` and :func:`load_run` alike).

    * ``metrics``: every metric of the run (``recall/<condition>``, ``<test>/<a>_vs_<b>/p_value``,
      ``claim/verdict``, ``cost/...``), latest values;
    * ``samples``: the run's ``samples.json``, one row per sample and condition (sample,
      condition, role, dose, answer, output, correct, context_length, depth, ...);
    * ``head_scores``: one row per detector and (layer, head): detector (its name; an extra
      detector's config key), layer, head, score, selected;
    * ``conditions``: one row per condition: its role, intervention, dose, recall, and the edit as
      logged in ``intervention/edits.json`` (heads masked, query dims zeroed per head);
    * ``figures``: the run's figures by artifact path (``detector/<name>/heatmap.png``,
      ``recall_by_depth.png``, ``claim/<claim>.png``...), each a matplotlib figure of the logged image.

    In Jupyter a result shows its recall per condition, key p-values, the claim's verdict and its figures.
    """

    run_id: str
    name: str
    status: str
    config: dict[str, Any] = field(repr=False)
    tags: dict[str, str] = field(repr=False)
    metrics: dict[str, float] = field(repr=False)
    samples: pd.DataFrame = field(repr=False)
    head_scores: pd.DataFrame = field(repr=False)
    conditions: pd.DataFrame = field(repr=False)
    figures: dict[str, Figure] = field(repr=False)

    @property
    def recall(self) -> pd.Series:
        """Recall (mean score) per condition, in the order the run evaluated them."""
        return self.conditions.set_index("condition")["recall"]

    @property
    def address(self) -> str:
        """Where to see the run in the MLflow UI (the lines the command line prints)."""
        return run_address(self.run_id)

    def key_metrics(self) -> dict[str, float]:
        """The p-values and claim metrics, as the command line prints them after a run."""
        return {k: v for k, v in self.metrics.items() if k.endswith("p_value") or k.startswith("claim/")}

    def show(self) -> None:
        """Display the result in Jupyter, as a cell that ends with it does: summary and figures."""
        self._ipython_display_()

    def _ipython_display_(self) -> None:
        shown = self.conditions[self.conditions["role"] != "null"][["condition", "role", "intervention", "dose", "recall"]]
        nulls = self.conditions.loc[self.conditions["role"] == "null", "recall"]
        more = f"<p>{len(nulls)} more random controls: mean recall {nulls.mean():.3f}</p>" if len(nulls) else ""
        metrics = "".join(f"<li><code>{k}</code> = {v:.4g}</li>" for k, v in self.key_metrics().items())
        _display(f"<h4>run {self.run_id} ({self.name}): {self.status}</h4>" + shown.to_html(index=False) + more
                 + (f"<ul>{metrics}</ul>" if metrics else ""), self.figures)

    def __repr__(self) -> str:
        recall = ", ".join(f"{k}={v:.3f}" for k, v in self.recall.items() if not str(k).startswith("null."))
        return f"Result(run {self.run_id} {self.status}: recall {recall}; {len(self.figures)} figures)"


def _store(tracking_uri: str | None) -> str:
    """The store to read from: ``tracking_uri``, else ``MLFLOW_TRACKING_URI``, else the local
    store of the current folder, which must exist (reading creates none)."""
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or local_tracking_uri()
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists():
        raise ConfigError(f"there is no tracking store {uri}: run from the folder that holds mlruns/, "
                          "or set MLFLOW_TRACKING_URI (or pass tracking_uri=)")
    mlflow.set_tracking_uri(uri)
    return uri


@contextmanager
def _quiet_downloads() -> Iterator[None]:
    """No progress bar for reading a run's few small artifacts, unless the user asked for one."""
    if "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR" in os.environ:
        yield
        return
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    try:
        yield
    finally:
        del os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"]


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.exists() else None


def _image_figure(path: Path) -> Figure:
    """A figure that draws the logged PNG at its own size, pixel for pixel."""
    image = matplotlib.image.imread(path)
    dpi = 100
    figure = Figure(figsize=(image.shape[1] / dpi, image.shape[0] / dpi), dpi=dpi)
    figure.figimage(image)
    return figure


def _head_scores(folder: Path) -> pd.DataFrame:
    """The main detector's (``detector/<name>/``) and extra detectors' (``detectors/<key>/``) scores."""
    tables = []
    for prefix in ("detector", "detectors"):
        for scores_file in sorted((folder / prefix).glob("*/scores.json")):
            scores = np.array(_read_json(scores_file)["scores"], dtype=float)
            selected = (_read_json(scores_file.with_name("selected_heads.json")) or {}).get("selected_heads", [])
            tables.append(head_table(scores_file.parent.name, scores, selected))
    columns = ["detector", "layer", "head", "score", "selected"]
    return pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(columns=columns)


def _conditions(edits: dict[str, Any], samples: pd.DataFrame, metrics: dict[str, float]) -> pd.DataFrame:
    order = list(dict.fromkeys(samples["condition"])) if "condition" in samples else [BASELINE]
    rows = []
    for label in order:
        edit = dict(edits.get(label, {}))
        rows.append({"condition": label, "role": edit.pop("role", BASELINE), "intervention": edit.pop("intervention", None),
                     "dose": edit.pop("dose", None), "recall": metrics.get(f"recall/{label}", np.nan), "edit": edit})
    return pd.DataFrame(rows)


def load_run(run_id: str, tracking_uri: str | None = None) -> Result:
    """A finished (or failed, or killed) run as a :class:`Result`, from the local store or the
    ``MLFLOW_TRACKING_URI`` server."""
    client = mlflow.MlflowClient(_store(tracking_uri))
    try:
        found = client.get_run(run_id)
    except MlflowException as error:
        raise ConfigError(f"no run {run_id!r} in {client.tracking_uri}: {error.message}") from None
    with tempfile.TemporaryDirectory() as download, _quiet_downloads():
        folder = Path(client.download_artifacts(run_id, "", download))
        table = _read_json(folder / "samples.json")
        samples = pd.DataFrame(table["data"], columns=table["columns"]) if table else pd.DataFrame()
        config_file = folder / "config.yaml"
        metrics = dict(found.data.metrics)
        return Result(
            run_id=run_id, name=found.info.run_name, status=found.info.status,
            config=yaml.safe_load(config_file.read_text()) if config_file.exists() else {},
            tags=dict(found.data.tags), metrics=metrics, samples=samples, head_scores=_head_scores(folder),
            conditions=_conditions(_read_json(folder / "intervention" / "edits.json") or {}, samples, metrics),
            figures={str(p.relative_to(folder)): _image_figure(p) for p in sorted(folder.rglob("*.png"))},
        )


_IDENTITY_TAGS = ("model", "model.family", "task", "detector", "intervention", "claim")
_KEY_PARAMS = ("seed", "controls", "dose.param", "dose.values", "task.context_lengths")


def _typed(column: pd.Series) -> pd.Series:
    """A parameter column (MLflow keeps params as text) as numbers where every value is one."""
    values = column.replace({"None": None})
    try:
        return pd.to_numeric(values)
    except (ValueError, TypeError):
        return values


def runs(experiment: str | Sequence[str] = DEFAULT_EXPERIMENT, filter_string: str = "",
         tracking_uri: str | None = None) -> pd.DataFrame:
    """One row per run of ``experiment`` (a name or several) matching ``filter_string`` (MLflow's
    search syntax, e.g. ``"tags.intervention = 'head_mask' and metrics.`recall/treatment` < 0.5"``),
    oldest first: run_id, run_name, status, start_time; the tags model, model.family, task,
    detector, intervention, claim; the parameters that differ between the runs, plus seed,
    controls, dose and context lengths (numbers where they are numbers); and every metric but
    MLflow's system metrics, each under its own name (``recall/treatment``, ``intervention.n_dims``)."""
    _store(tracking_uri)
    names = [experiment] if isinstance(experiment, str) else list(experiment)
    missing = [name for name in names if mlflow.get_experiment_by_name(name) is None]
    if missing:
        known = ", ".join(e.name for e in mlflow.search_experiments()) or "none"
        raise ConfigError(f"no experiment {', '.join(map(repr, missing))} in {mlflow.get_tracking_uri()}; "
                          f"experiments there: {known}")
    found = mlflow.search_runs(experiment_names=names, filter_string=filter_string, output_format="pandas",
                               order_by=["attributes.start_time ASC"])
    columns: dict[str, pd.Series] = {"run_id": found.get("run_id"), "run_name": found.get("tags.mlflow.runName"),
                                     "status": found.get("status"), "start_time": found.get("start_time")}
    for tag in _IDENTITY_TAGS:
        if f"tags.{tag}" in found:
            columns[tag] = found[f"tags.{tag}"]
    for name in (c for c in found.columns if c.startswith("params.")):
        key = name.removeprefix("params.")
        if key in _KEY_PARAMS or found[name].nunique(dropna=False) > 1:
            columns[key if key not in columns else name] = _typed(found[name])
    for name in (c for c in found.columns if c.startswith("metrics.") and not c.startswith("metrics.system/")):
        key = name.removeprefix("metrics.")
        columns[key if key not in columns else name] = found[name]
    return pd.DataFrame({k: v for k, v in columns.items() if v is not None}).reset_index(drop=True)
