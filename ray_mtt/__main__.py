from .errors import run_cli
from .pipeline import main

run_cli(main)
