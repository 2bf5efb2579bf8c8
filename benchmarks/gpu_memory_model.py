"""GPU memory of the 7-9B hub models in ``conf/model/`` at long context, on paper.

For each model and context length: the memory of one batch-1 prefill in bfloat16 on one GPU, as
the framework runs it (teacher-forced detection pass or the prefill before greedy decoding), and
whether it fits. The architectures are built from transformers config classes with the numbers
of each model's published ``config.json`` (written below; nothing is downloaded), the parameters
are counted on torch's meta device (no memory), and the rest follows from the formulas in the
small functions below (docs/long-context-memory.md writes them out). Lengths beyond a model's
positions are marked as the planner treats them: ``framework.planning.planner.check_context_lengths``
refuses a context that leaves no room for the generated tokens.

The peak of a prefill is weights + KV cache + the boolean masks the pass builds + the residual
stream + the largest transient of one layer: the MLP's intermediates, RMSNorm's float32 copies,
or the attention phase (query, key, value, RoPE temporaries, the mask's float copy and repeated
key/value where SDPA gets an explicit mask, the chunked manual path of soft-capped models, and
attn_mass's row capture). Beyond ``framework.model.masks.DENSE_LIMIT`` entries (a 2K x 2K pass)
an explicit mask is kept as a rule and read in query chunks: no length x length mask is built,
and the attention phase holds one chunk's mask block instead. Not modelled: the CUDA context (~0.5 GiB), allocator fragmentation.

Usage: python benchmarks/gpu_memory_model.py [--gpu-gib 80] [--lengths 8192 32768 131072]
       [--rows 64] [--new-tokens 12]
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    LlamaConfig,
    MistralConfig,
    Olmo2Config,
    PretrainedConfig,
    Qwen2Config,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's framework, not an installed one
from framework.interfaces import ConfigError  # noqa: E402
from framework.model import masks  # noqa: E402
from framework.model.attention import _ROW_CHUNK as MANUAL_ROW_CHUNK  # noqa: E402
from framework.planning.planner import check_context_lengths  # noqa: E402

GIB = 2**30
BF16 = 2  # bytes per element of the model's dtype on a GPU
FP32 = 4  # captured rows and RMSNorm's internal copies are float32
BOOL = 1  # an attention mask from transformers' sdpa_mask


def hub_configs() -> dict[str, tuple[str, PretrainedConfig]]:
    """conf/model name -> (hub id, config) with the published config.json numbers. RoPE
    settings are left at their defaults: they change no tensor's size."""
    return {
        "llama2_7b": ("meta-llama/Llama-2-7b-chat-hf", LlamaConfig(
            hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
            num_key_value_heads=32, head_dim=128, vocab_size=32000, max_position_embeddings=4096,
            tie_word_embeddings=False)),
        "llama31_8b": ("meta-llama/Llama-3.1-8B-Instruct", LlamaConfig(
            hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
            num_key_value_heads=8, head_dim=128, vocab_size=128256, max_position_embeddings=131072,
            tie_word_embeddings=False)),
        "mistral_7b": ("mistralai/Mistral-7B-Instruct-v0.3", MistralConfig(
            hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
            num_key_value_heads=8, head_dim=128, vocab_size=32768, max_position_embeddings=32768,
            sliding_window=None, tie_word_embeddings=False)),
        "olmo2_7b": ("allenai/OLMo-2-1124-7B-Instruct", Olmo2Config(
            hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
            num_key_value_heads=32, vocab_size=100352, max_position_embeddings=4096, tie_word_embeddings=False)),
        "qwen25_7b": ("Qwen/Qwen2.5-7B-Instruct", Qwen2Config(
            hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
            num_key_value_heads=4, vocab_size=152064, max_position_embeddings=32768, sliding_window=131072,
            use_sliding_window=False, max_window_layers=28, tie_word_embeddings=False)),
        "gemma2_9b": ("google/gemma-2-9b-it", Gemma2Config(
            hidden_size=3584, intermediate_size=14336, num_hidden_layers=42, num_attention_heads=16,
            num_key_value_heads=8, head_dim=256, vocab_size=256000, max_position_embeddings=8192,
            sliding_window=4096, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
            query_pre_attn_scalar=256, tie_word_embeddings=True)),
    }


@dataclass(frozen=True)
class Architecture:
    """The numbers that memory depends on, read from a transformers config."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied_embeddings: bool
    max_positions: int
    sliding_window: int | None
    sliding_layers: int  # layers whose attention is limited to the window
    softcap: bool  # logit soft-capping (Gemma-2): SDPA lacks it, so the framework's chunked manual path runs
    norms_per_layer: int  # RMSNorm weight vectors of size hidden in each decoder layer
    qk_norm: bool  # OLMo-2: RMSNorm over the whole query and key projections
    qkv_bias: bool  # Qwen2: biases on the query, key and value projections

    @classmethod
    def from_config(cls, config: PretrainedConfig) -> Architecture:
        window = getattr(config, "sliding_window", None)
        layer_types = getattr(config, "layer_types", None)
        sliding = (sum(t == "sliding_attention" for t in layer_types) if layer_types
                   else config.num_hidden_layers) if window else 0
        return cls(
            layers=config.num_hidden_layers, hidden=config.hidden_size, intermediate=config.intermediate_size,
            heads=config.num_attention_heads, kv_heads=config.num_key_value_heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads,
            vocab=config.vocab_size, tied_embeddings=bool(config.tie_word_embeddings),
            max_positions=config.max_position_embeddings, sliding_window=window if sliding else None,
            sliding_layers=sliding, softcap=getattr(config, "attn_logit_softcapping", None) is not None,
            norms_per_layer=4 if config.model_type == "gemma2" else 2, qk_norm=config.model_type == "olmo2",
            qkv_bias=config.model_type == "qwen2",
        )


# --- weights ---------------------------------------------------------------------------------
def meta_parameter_count(config: PretrainedConfig) -> int:
    """The model's parameters counted on the meta device: the architecture transformers would
    build, without allocating it (tied embeddings are one parameter, counted once)."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def parameter_formula(arch: Architecture) -> int:
    """The same count in closed form, so the weights can be written out per component:
    embeddings (twice if the output head is not tied) + per layer the four attention
    projections, the three MLP matrices, the norms (and QK-norm, QKV biases) + the final norm."""
    q, kv = arch.heads * arch.head_dim, arch.kv_heads * arch.head_dim
    attention = arch.hidden * q + 2 * arch.hidden * kv + q * arch.hidden
    attention += (q + kv) * arch.qk_norm + (q + 2 * kv) * arch.qkv_bias
    mlp = 3 * arch.hidden * arch.intermediate
    layer = attention + mlp + arch.norms_per_layer * arch.hidden
    embeddings = arch.vocab * arch.hidden * (1 if arch.tied_embeddings else 2)
    return embeddings + arch.layers * layer + arch.hidden


# --- caches and captures ---------------------------------------------------------------------
def kv_cache_bytes(arch: Architecture, tokens: int, batch: int = 1, dtype_bytes: int = BF16) -> int:
    """Key and value of every layer for ``tokens`` positions: 2 x layers x batch x kv_heads x
    tokens x head_dim x bytes. Sliding-window layers hold all of them too at the end of a
    prefill: transformers keeps their last window as a view of the full tensor, so the full
    storage lives until the first decode step replaces it."""
    return 2 * arch.layers * batch * arch.kv_heads * tokens * arch.head_dim * dtype_bytes


def captured_rows_bytes(heads: int, rows: int, keys: int, batch: int = 1) -> int:
    """What :func:`framework.model.attention.attention_probs` returns for one layer: float32
    probabilities [batch, heads, rows, keys]. attn_mass captures the question and answer rows of
    its teacher-forced pass (``rows`` of them); retrieval_score one row per decode step."""
    return batch * heads * rows * keys * FP32


def capture_transient_bytes(arch: Architecture, rows: int, keys: int, batch: int = 1, dtype_bytes: int = BF16) -> int:
    """Peak extra memory of one layer's row capture: twice the returned rows (scores and
    softmax alive together; measured 2.0x by benchmarks/capture_memory.py) plus the float32
    copies attention_probs makes of the query rows and, for a narrower model dtype, of one KV
    head's key at a time (keys x head_dim x 4 bytes: O(length), not O(rows x length))."""
    key_copy = batch * keys * arch.head_dim * FP32 if dtype_bytes < FP32 else 0
    query_rows = batch * arch.heads * rows * arch.head_dim * FP32
    return 2 * captured_rows_bytes(arch.heads, rows, keys, batch) + key_copy + query_rows


def repeated_key_bytes(arch: Architecture, keys: int, batch: int = 1) -> int:
    """What one layer's capture would add with the key repeated per query head in float32
    (``repeat_kv``, before the capture worked per KV group): heads x keys x head_dim x 4 bytes."""
    return batch * arch.heads * keys * arch.head_dim * FP32


def utility_inputs_bytes(arch: Architecture, rows: int, tokens: int) -> int:
    """What the utility detector holds on the device per detection sample until its fit: every
    layer's query rows, key, value (float32) and the rows' mask bias [rows, tokens] (float32)."""
    per_layer = arch.heads * rows * arch.head_dim + 2 * arch.kv_heads * tokens * arch.head_dim + rows * tokens
    return arch.layers * per_layer * FP32


def logits_bytes(arch: Architecture, positions: int, batch: int = 1, dtype_bytes: int = BF16) -> int:
    """The output head's logits for ``positions`` positions; every detector pass and generation
    keeps one (``logits_to_keep=1``) instead of the prompt's length."""
    return batch * positions * arch.vocab * dtype_bytes


# --- one prefill layer -----------------------------------------------------------------------
def explicit_mask_needed(arch: Architecture, tokens: int, padded: bool) -> bool:
    """Whether attention gets a materialised mask instead of SDPA's causal flag: a padded batch,
    or sliding-window layers once the keys reach the window (transformers' sdpa_mask skips the
    mask only for unpadded full-causal attention and windows longer than the keys)."""
    return padded or (arch.sliding_layers > 0 and tokens >= arch.sliding_window)


def rule_mask(tokens: int) -> bool:
    """Whether a pass's explicit masks are kept as rules (:func:`framework.model.masks.rule_mask`):
    read in query chunks, never built whole."""
    return tokens * tokens > masks.DENSE_LIMIT


def resident_mask_bytes(arch: Architecture, tokens: int, batch: int = 1, padded: bool = False) -> int:
    """Boolean masks [batch, 1, tokens, tokens] built once per forward pass and held through it:
    one for the sliding-window layers when needed, one for the full layers of a padded batch;
    none beyond ``masks.DENSE_LIMIT`` entries, where they are rules."""
    if rule_mask(tokens):
        return 0
    full_layers = arch.layers - arch.sliding_layers
    kinds = int(full_layers > 0 and padded) + int(arch.sliding_layers > 0 and explicit_mask_needed(arch, tokens, padded))
    return kinds * batch * tokens * tokens * BOOL


def residual_bytes(arch: Architecture, tokens: int, batch: int = 1, dtype_bytes: int = BF16) -> int:
    """The residual stream and the normalised layer input, alive through each sub-block."""
    return 2 * batch * tokens * arch.hidden * dtype_bytes


def norm_bytes(arch: Architecture, tokens: int, batch: int = 1) -> int:
    """RMSNorm computes in float32: the upcast input and the normalised product coexist."""
    return 2 * batch * tokens * arch.hidden * FP32


def mlp_bytes(arch: Architecture, tokens: int, batch: int = 1, dtype_bytes: int = BF16) -> int:
    """down(act(gate(x)) * up(x)): act(gate), up and their product coexist, three
    [tokens, intermediate] tensors. Not chunked: the largest transient of a long prefill."""
    return 3 * batch * tokens * arch.intermediate * dtype_bytes


def attention_bytes(arch: Architecture, tokens: int, batch: int = 1, dtype_bytes: int = BF16,
                    explicit_mask: bool = False) -> int:
    """The attention phase of one layer, capture excluded. Four query-sized tensors (projection,
    the two RoPE products, the rotated query; later output and its contiguous copy) plus key and
    value. With no mask, SDPA runs an O(length) fused kernel on CUDA and reads the key at KV-head
    count. An explicit mask on the SDPA path adds its float copy (SDPA turns a boolean mask into
    an additive one) and the key and value repeated per query head (transformers enables SDPA's
    GQA only without a mask). Soft-capped models take the framework's manual path instead:
    float32 scores for a chunk of query rows against every key (scores, capped, softmax), one KV
    head's key upcast to float32 at a time, and the chunks' outputs before and after concatenation.
    A rule mask (a long pass) is read a chunk at a time: a bool block and its additive copy per
    chunk of query rows against at most every key, SDPA's GQA kept (no repeated key and value), and
    the chunks' outputs before their concatenation."""
    query = batch * tokens * arch.heads * arch.head_dim * dtype_bytes
    key = batch * tokens * arch.kv_heads * arch.head_dim * dtype_bytes
    total = 4 * query + 2 * key
    if arch.softcap:
        chunk = min(MANUAL_ROW_CHUNK, tokens)
        total += 3 * batch * arch.heads * chunk * tokens * FP32 + key // arch.kv_heads * FP32 // dtype_bytes + 2 * query
    elif explicit_mask and rule_mask(tokens):
        chunk = min(MANUAL_ROW_CHUNK, tokens)
        total += batch * chunk * tokens * (BOOL + dtype_bytes) + query
    elif explicit_mask:
        repeated = 2 * batch * arch.heads * tokens * arch.head_dim * dtype_bytes if arch.heads != arch.kv_heads else 0
        total += batch * tokens * tokens * dtype_bytes + repeated
    return total


@dataclass
class Prefill:
    """One batch-1 prefill's memory, in bytes (see the module docstring for how they combine)."""

    weights: int
    kv_cache: int
    masks: int
    residual: int
    mlp: int
    norm: int
    attention: int
    padded_masks: int  # the masks and attention phase of the same pass with an explicit mask on
    padded_attention: int  # every layer, as a padded batch has (per sequence)
    rows: int  # attn_mass: one layer's captured probabilities
    capture: int  # attn_mass: the capture's transient in the attention phase
    decode_row: int  # retrieval_score: one layer's captured row per decode step
    logits: int

    def _peak(self, masks: int, attention: int) -> int:
        layer = self.residual + max(self.mlp, self.norm, attention + self.capture)
        return self.weights + self.kv_cache + masks + layer + self.logits

    @property
    def total(self) -> int:
        return self._peak(self.masks, self.attention)

    @property
    def padded_total(self) -> int:
        return self._peak(self.padded_masks, self.padded_attention)


def prefill_memory(arch: Architecture, weights: int, tokens: int, rows: int, dtype_bytes: int = BF16) -> Prefill:
    """Every component of a batch-1 prefill of ``tokens`` positions with attn_mass capturing
    ``rows`` rows per layer (the largest pass a run makes: generation's prefill is the same
    without the capture, its decode steps hold the same cache and a single row)."""
    explicit = explicit_mask_needed(arch, tokens, padded=False)
    return Prefill(
        weights=weights, kv_cache=kv_cache_bytes(arch, tokens, 1, dtype_bytes),
        masks=resident_mask_bytes(arch, tokens), residual=residual_bytes(arch, tokens, 1, dtype_bytes),
        mlp=mlp_bytes(arch, tokens, 1, dtype_bytes), norm=norm_bytes(arch, tokens),
        attention=attention_bytes(arch, tokens, 1, dtype_bytes, explicit),
        padded_masks=resident_mask_bytes(arch, tokens, 1, padded=True),
        padded_attention=attention_bytes(arch, tokens, 1, dtype_bytes, explicit_mask=True),
        rows=captured_rows_bytes(arch.heads, rows, tokens),
        capture=capture_transient_bytes(arch, rows, tokens, 1, dtype_bytes),
        decode_row=captured_rows_bytes(arch.heads, 1, tokens), logits=logits_bytes(arch, 1, 1, dtype_bytes),
    )


def planner_refusal(name: str, config: PretrainedConfig, tokens: int, new_tokens: int) -> str | None:
    """The planner's verdict on a context of ``tokens``: None if it accepts it, else why not."""
    run = {"model": {"name": name}, "task": {"context_lengths": [tokens], "max_new_tokens": new_tokens}}
    try:
        check_context_lengths(run, config)
    except ConfigError:
        return f"refused: over {config.max_position_embeddings - new_tokens} usable positions"
    return None


# --- report ----------------------------------------------------------------------------------
def _gib(value: int) -> str:
    return f"{value / GIB:.2f}"


def _mib(value: int) -> str:
    return f"{value / 2**20:.1f}"


def print_tables(lengths: list[int], rows: int, gpu_gib: float, new_tokens: int) -> None:
    header = (f"{'tokens':>7} | {'weights':>7} | {'KV cache':>8} | {'masks':>6} | {'resid.':>6} | {'MLP':>6} | "
              f"{'attn':>6} | {f'rows({rows}) MiB':>13} | {'capture MiB':>11} | {'row/step MiB':>12} | "
              f"{'peak':>6} | {'fits':>4} | {'padded':>6} | {'fits':>4} | planner")
    extras = []
    for name, (hub_id, config) in hub_configs().items():
        arch = Architecture.from_config(config)
        count = meta_parameter_count(config)
        if count != parameter_formula(arch):
            raise RuntimeError(f"{name}: closed-form parameter count {parameter_formula(arch)} != meta count {count}")
        window = f"sliding window {arch.sliding_window} on {arch.sliding_layers} layers" if arch.sliding_layers else "no sliding window"
        print(f"\n{name} ({hub_id}): {arch.layers} layers, {arch.heads} heads / {arch.kv_heads} KV heads x {arch.head_dim}, "
              f"hidden {arch.hidden}, MLP {arch.intermediate}, vocab {arch.vocab}, {count / 1e9:.2f} B parameters; "
              f"max_position_embeddings {arch.max_positions}; {window}{'; soft-capped (manual attention path)' if arch.softcap else ''}")
        print(header)
        print("-" * len(header))
        for tokens in lengths:
            memory = prefill_memory(arch, count * BF16, tokens, rows)
            refusal = planner_refusal(name, config, tokens, new_tokens)
            fits = ["yes" if peak <= gpu_gib * GIB else "no" for peak in (memory.total, memory.padded_total)]
            print(f"{tokens:>7} | {_gib(memory.weights):>7} | {_gib(memory.kv_cache):>8} | {_gib(memory.masks):>6} | "
                  f"{_gib(memory.residual):>6} | {_gib(memory.mlp):>6} | {_gib(memory.attention):>6} | "
                  f"{_mib(memory.rows):>13} | {_mib(memory.capture):>11} | {_mib(memory.decode_row):>12} | "
                  f"{_gib(memory.total):>6} | {fits[0]:>4} | {_gib(memory.padded_total):>6} | {fits[1]:>4} | "
                  f"{refusal or 'accepted'}")
            extras.append((name, tokens, logits_bytes(arch, tokens), repeated_key_bytes(arch, tokens),
                           utility_inputs_bytes(arch, rows, tokens)))
    print(f"\nGiB unless marked MiB, batch 1, bfloat16; fits: peak <= {gpu_gib:g} GiB. Peak = weights + KV cache + masks + resid. + "
          f"max(MLP, RMSNorm float32 copies, attn + capture) + one row of logits. padded: the same peak with an "
          f"explicit mask on every layer, as a padded batch has (per sequence). rows({rows}): attn_mass's captured probabilities per layer for {rows} "
          f"question/answer rows; capture: their transient; row/step: retrieval_score's per layer and decode step. "
          f"planner: framework.planning.planner.check_context_lengths with {new_tokens} new tokens.")
    print(f"\nAvoided by the framework / held by it (GiB): logits of every position (avoided: logits_to_keep=1), "
          f"one layer's key repeated per query head in float32 for a capture (avoided: per-KV-group capture), "
          f"and the utility detector's captured inputs held per detection sample ({rows} rows; not avoided)")
    print(f"{'model':<11} | {'tokens':>7} | {'all logits':>10} | {'repeated keys':>13} | {'utility/sample':>14}")
    for name, tokens, logits, repeated, utility in extras:
        print(f"{name:<11} | {tokens:>7} | {_gib(logits):>10} | {_gib(repeated):>13} | {_gib(utility):>14}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu-gib", type=float, default=80.0, help="the GPU's memory in GiB")
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768, 131072], help="context lengths in tokens")
    parser.add_argument("--rows", type=int, default=64, help="query rows attn_mass captures (question + answer tokens)")
    parser.add_argument("--new-tokens", type=int, default=12, help="task.max_new_tokens, as the planner counts it (niah: 12)")
    args = parser.parse_args()
    print_tables(args.lengths, args.rows, args.gpu_gib, args.new_tokens)


if __name__ == "__main__":
    main()
