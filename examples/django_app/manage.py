#!/usr/bin/env python
"""Django's command-line utility for the example project: ``python manage.py demo``."""

import os
import sys
from pathlib import Path


def main() -> None:
    # Runnable from any folder: the project's packages sit next to this file.
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)


if __name__ == "__main__":
    main()
