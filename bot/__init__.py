"""A self-hosted Discord chat bot running a local LLM through llama.cpp."""

__version__ = "0.1.0"
