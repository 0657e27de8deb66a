"""gptoss's eval data: grading specs (``suites.json``) and the built-in suites' data files.

Shipped as the package ``gptoss_evals`` (``[tool.setuptools.package-dir]`` in pyproject.toml)
and read with ``importlib.resources``; the code that uses them is ``gptoss_cli/suites.py``.
"""
