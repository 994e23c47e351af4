"""`toonify weights check`: the local perceptual-loss weights, verified (filled in by issue 15)."""

from __future__ import annotations

import argparse


def add_weights_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    s = subparsers.add_parser("weights", help="check the local VGG16/LPIPS weight files")
    return s
