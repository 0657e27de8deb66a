"""``python -m gptoss_cli``: the same as the ``gptoss`` command."""

from .cli import app

app(prog_name="gptoss")
