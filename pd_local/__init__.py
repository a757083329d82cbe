"""pd_local: single-host prefill/decode disaggregated LLM inference."""

__version__ = "0.1.0"
