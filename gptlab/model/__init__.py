from gptlab.model.gpt import ARCHS, GPT, PRESETS, GPTConfig, KVCache

__all__ = ["ARCHS", "GPT", "GPTConfig", "KVCache", "PRESETS"]
