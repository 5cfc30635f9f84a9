"""Model zoo (classifiers with `.features`/`.head`)."""

from cycle.models.zoo import (
    Classifier,
    PretrainedWeightsError,
    available_architectures,
    build_model,
    load_state_dict,
    register,
)

__all__ = [
    "Classifier",
    "PretrainedWeightsError",
    "available_architectures",
    "build_model",
    "load_state_dict",
    "register",
]
