"""`python -m segdiff.phantoms`: synthetic phantom data sets (segdiff.data.phantoms).

The command's home is `segdiff.cli.phantoms`; this module keeps its public name.
"""

from .cli.phantoms import main

if __name__ == "__main__":
    main()
