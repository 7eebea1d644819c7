import pytest
import torch


@pytest.fixture(autouse=True)
def _isolated(tmp_path_factory, monkeypatch):
    """Each test gets its own cache folder and a fixed thread count."""
    monkeypatch.setenv("FRUGALDIFF_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    torch.set_num_threads(2)


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
