"""``python -m ckptconv`` (what ``torchrun -m ckptconv ...`` runs)."""

from ckptconv.cli import main

main()
