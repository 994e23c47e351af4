"""`toonify styles …`: turn checkpoint files into manifest styles (filled in by issue 15)."""

from __future__ import annotations

import argparse


def add_styles_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    s = subparsers.add_parser("styles", help="add, list, show, remove styles of a models folder")
    return s
