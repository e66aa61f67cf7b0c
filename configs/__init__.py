"""The shipped configs: one YAML per dataset x IPC (published hyperparameters) and the digits default.

This top-level folder is the one source; it installs as the package data `ray_mtt.configs`
(pyproject.toml maps the package to this folder), so a non-editable install finds it too.
"""
