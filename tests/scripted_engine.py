"""An engine that answers with scripted Harmony text instead of a model: each ``generate`` call
plays the next reply, token by token, so chat tests can make "the model" call tools."""

from __future__ import annotations

import time
from types import SimpleNamespace

import torch

from gptoss_cli.engine import GenerationStats


class ScriptedEngine:
    def __init__(self, encoding, replies: list[str], max_context: int = 8192, delay_s: float = 0.0):
        self.tokenizer = encoding
        self.replies = list(replies)
        self.prompts: list[list[int]] = []      # every prompt it was given, in order
        self.max_context = max_context
        self.device = torch.device("cpu")
        self.config = SimpleNamespace(random_weights=False)
        self.last_stats = GenerationStats()
        self.delay_s = delay_s

    def generate(self, tokens, max_new_tokens=256, temperature=1.0, top_p=1.0, stop_tokens=(), seed=None):
        self.prompts.append(list(tokens))
        text = self.replies.pop(0) if self.replies else "<|channel|>final<|message|>(no more script)<|return|>"
        st = self.last_stats = GenerationStats(prompt_tokens=len(tokens), prefill_tokens=len(tokens))
        for i, tok in enumerate(self.tokenizer.encode(text, allowed_special="all")[:max_new_tokens]):
            if self.delay_s:
                time.sleep(self.delay_s)
            st.decode_tokens = i
            yield tok
            if tok in stop_tokens:
                st.stop_reason = "stop"
                return
        st.stop_reason = "length"
