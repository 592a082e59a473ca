"""draftforge: train EAGLE-3 speculative-decoding draft models for Hugging Face LLMs."""

__version__ = "0.1.0"
