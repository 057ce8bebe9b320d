"""lmforge's model: one GPT covering GPT-2, Falcon, Gemma and Llama (single-device code)."""

from model.config import PRESETS, GPTConfig
from model.gpt import GPT

__all__ = ["GPT", "PRESETS", "GPTConfig"]
