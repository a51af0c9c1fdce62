"""The model: UNet presets (`unet`), the model card (`card`), `SegDiffPipeline` with its samplers, students
and cascades (`pipeline`), and sampling many images to disk (`sampling`)."""
