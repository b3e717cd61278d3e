"""The encoder tests' fixtures (tests/encoders.py)."""

from tests.encoders import enc_store, minilm, tiny_bert  # noqa: F401
