"""gptoss: a terminal and a PyTorch + Triton runtime for OpenAI's gpt-oss models."""

__version__ = "0.1.0"
