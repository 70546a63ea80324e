"""``python -m retrolm.cli ...`` (what torchrun launches)."""

from retrolm.cli import main

if __name__ == "__main__":
    main()
