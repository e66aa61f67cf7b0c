"""The algorithm in pure PyTorch (+ kornia; pyarrow and ffcv optional). Never imports ray, mlflow,
optuna or the layers above it (tests/test_layers.py parses every file to check)."""
