"""raymtl: one BERT-style encoder for several sentence tasks, trained on Ray Train + DeepSpeed.

``raymtl.load(checkpoint)`` gives a trained model to use from Python (``raymtl.api``).
"""


def load(checkpoint, device: str = "auto"):
    """A raymtl checkpoint -> ``raymtl.api.TrainedModel`` (``predict``, ``encode``, ``similarity``)."""
    from raymtl.api import load as _load  # torch and transformers load only when a model is used
    return _load(checkpoint, device)
