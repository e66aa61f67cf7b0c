"""ray_mtt: dataset distillation by Matching Training Trajectories.

Three layers, imports pointing one way (a test parses every file to keep it so):
  cli/    every command's main: argparse, printing, engine choice, one-line errors
  scale/  the only code that imports ray, mlflow or optuna: Ray Train experts, Ray Tune sweeps, MLflow
  core/   the algorithm in pure PyTorch (+ kornia; pyarrow and ffcv optional): runs on a bare GPU box
"""
__version__ = "0.1.0"
