"""``python -m mulan`` (and ``torchrun -m mulan``) run the command line."""

from mulan.cli import main

if __name__ == "__main__":
    main()
