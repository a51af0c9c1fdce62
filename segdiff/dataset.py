"""`python -m segdiff.dataset`: new image-mask pairs from a model (segdiff.synth.pairs).

The command's home is `segdiff.cli.dataset`; this module keeps its public name.
"""

from .cli.dataset import main

if __name__ == "__main__":
    main()
