"""``python -m attnseg.cli``."""

from attnseg.cli import main

main()
