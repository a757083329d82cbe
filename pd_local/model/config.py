"""ModelConfig: the architecture facts the model code needs, read from a Hugging Face config.json.

One frozen dataclass for the whole Llama family we support. Every supported architecture maps
onto it; anything else is refused here, at start-up, with the list of what is supported.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SUPPORTED_ARCHITECTURES: tuple[str, ...] = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
)


class ModelConfigError(ValueError):
    """A config.json we cannot serve; the message names the field and the value."""


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3.x frequency-dependent rope scaling ("rope_type": "llama3")."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool = False  # Qwen2: bias on q/k/v projections
    qk_norm: bool = False  # Qwen3: RMSNorm over each head of q and k before rope
    rope_scaling: RopeScaling | None = None

    def __post_init__(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ModelConfigError(
                f"architecture {self.architecture!r} is not supported; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                     "num_heads", "num_kv_heads", "head_dim", "max_position_embeddings"):
            if getattr(self, name) <= 0:
                raise ModelConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ModelConfigError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})"
            )

    def check_tp(self, tp: int) -> None:
        """ModelConfigError, with the numbers, unless heads, KV heads and FFN split over tp ranks."""
        if not isinstance(tp, int) or tp < 1:
            raise ModelConfigError(f"tensor parallel size must be an integer >= 1, got {tp!r}")
        for what, n in (("attention heads", self.num_heads), ("KV heads", self.num_kv_heads),
                        ("FFN columns (intermediate_size)", self.intermediate_size)):
            if n % tp:
                raise ModelConfigError(f"tensor parallel {tp}: the model's {n} {what} do not split over {tp} ranks")

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of K+V per token across all layers, per byte of element size (multiply by dtype size)."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        archs = raw.get("architectures") or []
        if not archs:
            raise ModelConfigError(
                "config.json has no 'architectures' entry; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        arch = archs[0]
        try:
            hidden = int(raw["hidden_size"])
            heads = int(raw["num_attention_heads"])
            layers = int(raw["num_hidden_layers"])
            inter = int(raw["intermediate_size"])
            vocab = int(raw["vocab_size"])
        except KeyError as e:
            raise ModelConfigError(f"config.json is missing required field {e.args[0]!r}") from None
        # transformers 5 moves rope settings into "rope_parameters"; 4.x keeps them top level.
        rope_params = raw.get("rope_parameters") or {}
        rope_theta = float(raw.get("rope_theta", rope_params.get("rope_theta", 10000.0)))
        scaling_raw = raw.get("rope_scaling") or (
            rope_params if rope_params.get("rope_type", "default") != "default" else None
        )
        rope_scaling = None
        if scaling_raw:
            rope_type = scaling_raw.get("rope_type", scaling_raw.get("type"))
            if rope_type == "llama3":
                rope_scaling = RopeScaling(
                    factor=float(scaling_raw["factor"]),
                    low_freq_factor=float(scaling_raw["low_freq_factor"]),
                    high_freq_factor=float(scaling_raw["high_freq_factor"]),
                    original_max_position_embeddings=int(
                        scaling_raw["original_max_position_embeddings"]
                    ),
                )
            elif rope_type not in (None, "default"):
                raise ModelConfigError(
                    f"rope scaling type {rope_type!r} is not supported (supported: llama3, default)"
                )
        max_pos = int(raw.get("max_position_embeddings", 2048))
        # Mistral's sliding window: we attend over the full context, which is exact only while the
        # context fits the window, so the window caps the context we accept.
        window = raw.get("sliding_window")
        if window and (arch == "MistralForCausalLM" or raw.get("use_sliding_window")):
            max_pos = min(max_pos, int(window))
        return cls(
            architecture=arch,
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=inter,
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=int(raw.get("num_key_value_heads") or heads),
            head_dim=int(raw.get("head_dim") or hidden // heads),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            max_position_embeddings=max_pos,
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            attention_bias=bool(raw.get("attention_bias", arch == "Qwen2ForCausalLM")),
            qk_norm=arch == "Qwen3ForCausalLM",
            rope_scaling=rope_scaling,
        )

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> ModelConfig:
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise ModelConfigError(f"{path} not found: is {model_dir} a Hugging Face model directory?")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ModelConfigError(f"{path} is not valid JSON: {e}") from None
        return cls.from_dict(raw)
