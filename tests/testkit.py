"""Constants shared by the test modules."""

# A network small enough that a few hundred steps take seconds on a 2-core CPU.
TINY_UNET = {
    "data.name": "digits",
    "model.channels": 8,
    "model.channel_mult": [1, 2],
    "model.num_res_blocks": 1,
    "model.attention_resolutions": [4],
    "train.batch_size": 16,
    "train.warmup_images": 64,
    "sample.n": 16,
    "sample.steps": 8,
}


class RecordingObjective:
    """Wraps a run's objective and records every batch it is given (the share one rank and micro-step trains on)."""

    def __init__(self, objective):
        self.objective, self.batches = objective, []

    def __getattr__(self, name):
        return getattr(self.objective, name)

    def __call__(self, model, batch):
        self.batches.append(batch)
        return self.objective(model, batch)
