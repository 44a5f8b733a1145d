"""Integrations of pyformer's kernels with other libraries.

- :mod:`pyformer.integrations.transformers`: an attention implementation for Hugging Face
  ``transformers`` (``register()``, then ``attn_implementation="pyformer"``).

Nothing here is imported with ``pyformer``: each integration imports its library when used.
"""
