"""ray_mtt: dataset distillation by Matching Training Trajectories.

The algorithm (config, data, augment, models, experts, trajectories, distill, evaluate) is pure
PyTorch + kornia; Ray and MLflow live only in the orchestration modules on top of it.
"""
__version__ = "0.1.0"
