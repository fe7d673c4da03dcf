"""Optional integrations with other libraries.

Each submodule imports its library when it is itself imported, never from here, so ``import
flexsparse`` works without them:

* :mod:`flexsparse.integrations.transformers`: flexsparse patterns as a Hugging Face
  ``transformers`` attention implementation (``pip install "flexsparse[hf]"``).
"""
