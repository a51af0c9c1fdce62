"""Measuring generated images: the Dice segmenter trained on real images (`segmenter`), quality:
faithfulness, realism and detail (`quality`), and realism as the field measures it: FRD and a classifier
two-sample test (`realism`)."""
