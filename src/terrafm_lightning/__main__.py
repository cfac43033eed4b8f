"""``python -m terrafm_lightning``: the ``terrafm`` command."""

from terrafm_lightning.cli import main

main()
