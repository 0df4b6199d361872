"""``python -m ckptconv`` (what ``torchrun -m ckptconv ...`` runs)."""

from ckptconv.entry import main

main()
