"""Training: the LightningModule, `train`, the optimizer and schedule, the progress bar, checkpoint averaging, curves and the bench."""
