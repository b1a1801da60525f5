"""retune: train a language model on your own data, and keep it trained."""

__version__ = "0.1.0"
