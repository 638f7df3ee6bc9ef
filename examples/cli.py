"""LightningCLI entry point for the digits example: everything, EMACallback included, comes from YAML.

python examples/cli.py fit --config examples/config.yaml
"""

from __future__ import annotations

from digits import DigitsClassifier, DigitsDataModule
from lightning.pytorch.cli import LightningCLI


def main(args: list[str] | None = None) -> LightningCLI:
    return LightningCLI(DigitsClassifier, DigitsDataModule, args=args, save_config_kwargs={"overwrite": True})


if __name__ == "__main__":
    main()
