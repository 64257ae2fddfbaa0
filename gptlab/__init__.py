"""gptlab: build a ChatGPT from its parts.

    from gptlab import GPT, GPTConfig, Tokenizer, Engine, SamplingParams, load_run

Names are imported lazily so `gptlab --help` and light commands start fast.
"""
__version__ = "0.1.0"

_EXPORTS = {
    "GPT": "gptlab.model.gpt",
    "GPTConfig": "gptlab.model.gpt",
    "KVCache": "gptlab.model.gpt",
    "Tokenizer": "gptlab.tokenizer",
    "Engine": "gptlab.generate.engine",
    "SamplingParams": "gptlab.generate.engine",
    "load_run": "gptlab.runs",
    "TrainConfig": "gptlab.train.loop",
    "train": "gptlab.train.loop",
    "GptlabError": "gptlab.errors",
}

__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        import importlib
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'gptlab' has no attribute {name!r}")
