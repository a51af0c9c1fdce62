"""`python -m segdiff.volumes`: NIfTI and DICOM volumes to slices and back (segdiff.data.volumes, segdiff.synth.volumes).

The command's home is `segdiff.cli.volumes`; this module keeps its public name.
"""

from .cli.volumes import main

if __name__ == "__main__":
    main()
