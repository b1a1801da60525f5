"""The model wing: base models and tokenizers, the chat template, the training core, holdout
scoring and reply generation, and the reply metrics."""
