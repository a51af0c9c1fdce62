"""Measuring generated images: the Dice segmenter trained on real images (`segmenter`), and quality:
faithfulness, realism and detail (`quality`)."""
