"""``python -m dgmr.cli`` (what ``torchrun -m dgmr.cli distill ...`` runs)."""
import sys

from . import main

sys.exit(main())
