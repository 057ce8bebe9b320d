"""``python -m train [hydra overrides]``: see train/main.py and conf/config.yaml."""

from train.main import cli

cli()
