"""Ignite handlers that MONAI's own do not cover."""

from __future__ import annotations

from monai.handlers import CheckpointSaver


class BestModelSaver(CheckpointSaver):
    """MONAI's ``CheckpointSaver`` for the best key metric, whose ranking survives a resumed run.

    ``state_dict()`` returns the saver's record of the best score so far, so that putting this
    handler in the resumable checkpoint's ``save_dict`` (and ``CheckpointLoader``'s ``load_dict``)
    keeps a resumed run from overwriting ``model.pt`` with a worse model. The weights file itself
    stays a plain state dict.
    """

    def __init__(self, save_dir: str, save_dict: dict, key_metric_filename: str = "model.pt", **kwargs):
        super().__init__(save_dir, save_dict, save_key_metric=True, key_metric_filename=key_metric_filename, **kwargs)

    def state_dict(self) -> dict:
        return self._key_metric_checkpoint.state_dict()
