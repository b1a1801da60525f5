"""The release wing: MLflow tracking, the model registry and its aliases, the promotion gate,
and the code version a model came from."""
