"""cycle: make chest X-ray classifiers look at the lungs, and prove it.

Train -> Grad-CAM over the training set -> lung masks -> enhanced training set -> fine-tune ->
evaluate on the original images -> repeat; on Ray, tracked in MLflow.
"""

__version__ = "0.1.0"
