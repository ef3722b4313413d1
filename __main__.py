"""`python -m distill ...`: the same commands as the `distill` console script (e.g. under `torchrun -m distill`)."""

from distill.cli import main

if __name__ == "__main__":
    main()
