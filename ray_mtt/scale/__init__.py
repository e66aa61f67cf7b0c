"""The orchestration layer, the only code that imports ray, mlflow or optuna: experts on Ray Train,
sweeps on Ray Tune, MLflow runs. It drives ray_mtt.core through the callbacks the core exposes."""
