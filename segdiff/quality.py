"""`python -m segdiff.quality`: the Dice segmenter and a model's measured quality (segdiff.measure).

The command's home is `segdiff.cli.quality`; this module keeps its public name.
"""

from .cli.quality import main

if __name__ == "__main__":
    main()
