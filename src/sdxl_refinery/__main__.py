"""`python -m sdxl_refinery` runs the `refinery` command."""

from .cli import main

main()
