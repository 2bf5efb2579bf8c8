"""The public API for plugin authors: everything a detector, intervention, task or statistical
test needs, importable from this one module (``from framework.api import ...``).

The built-in plugins in ``plugins/`` import from here and nowhere else in the framework, so this
is exactly the surface they use; names not listed in ``__all__`` are internal and may change.
See docs/writing-a-plugin.md for a walkthrough per plugin kind.
"""

from framework.hookspecs import hookimpl
from framework.interfaces import (
    SCORE_KINDS,
    Condition,
    ConfigError,
    Detector,
    HeadScores,
    Intervention,
    LoadedModel,
    ModelInfo,
    RunContext,
    Sample,
    Split,
    StatTest,
    Task,
)
from framework.model.attention import (
    MASK_MODES,
    PHASES,
    AttentionEdit,
    AttentionInputs,
    AttentionPass,
    Head,
    HeadEdit,
    HeadMasking,
    QueryScaling,
    RowCapture,
    StreamingWindow,
    attention_rows,
    instrumented,
    key_bias,
    mean_head_outputs,
    per_head,
)
from framework.model.heads import check_selection, layer_groups_by_type, random_heads_matched_per_layer, select_heads
from framework.model.loading import load_model, prepare
from framework.model.masks import RuleMask
from framework.model.query_dims import QueryDimIntervention
from framework.model.rope import (
    check_dim_count,
    check_raw_count,
    first_raw_dims,
    highest_frequency_dims,
    last_raw_dims,
    layer_inv_freq,
    lowest_frequency_dims,
    random_pair_dims,
    random_raw_dims,
)
from framework.prompts import (
    PositionedTask,
    chat_frame,
    chat_sample,
    check_count,
    encode,
    is_whole,
    read_haystack,
    read_needles,
    token_span,
    word_recall,
)
from framework.registry import create_plugin
from framework.repeats import PreviousOccurrence
from framework.runner.progress import Progress, track
from framework.statistics import cohens_d, cohens_dz, mcnemar_exact

__all__ = [
    # registering plugins
    "hookimpl", "create_plugin",
    # the four plugin kinds and the data they exchange
    "Detector", "Intervention", "Task", "StatTest", "Sample", "Split", "ModelInfo", "LoadedModel", "HeadScores",
    "RunContext", "Condition", "ConfigError", "SCORE_KINDS",
    # reading and editing attention
    "Head", "AttentionEdit", "HeadEdit", "HeadMasking", "QueryScaling", "per_head", "MASK_MODES", "PHASES",
    "AttentionPass", "StreamingWindow", "RuleMask", "RowCapture", "AttentionInputs", "instrumented", "attention_rows", "key_bias", "mean_head_outputs",
    "QueryDimIntervention",
    # RoPE dimensions
    "layer_inv_freq", "lowest_frequency_dims", "highest_frequency_dims", "random_pair_dims", "first_raw_dims",
    "last_raw_dims", "random_raw_dims", "check_dim_count", "check_raw_count",
    # head selection
    "select_heads", "check_selection", "random_heads_matched_per_layer", "layer_groups_by_type",
    # detectors' building blocks
    "PreviousOccurrence",
    # prompts, samples and scores for tasks
    "chat_frame", "token_span", "encode", "chat_sample", "PositionedTask", "word_recall", "is_whole", "check_count",
    "read_haystack", "read_needles",
    # statistics
    "mcnemar_exact", "cohens_d", "cohens_dz",
    # progress lines
    "Progress", "track",
    # models, for a plugin's own tests
    "load_model", "prepare",
]
