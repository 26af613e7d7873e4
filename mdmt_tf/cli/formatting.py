"""Help formatting shared by the sub-commands."""
from __future__ import annotations

import argparse


class DefaultsHelp(argparse.ArgumentDefaultsHelpFormatter):
    """Shows '(default: X)' after a flag's help, except where the default is None: those
    flags defer to a setting's own default (TrainConfig's), which their help states."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)
