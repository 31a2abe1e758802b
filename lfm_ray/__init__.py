"""lfm-ray: studies of Local Feature Mixup (text-guided mixup) for long-tailed CLIP fine-tuning.

Data flows one way: data → model and mixing → trainer → study → analysis. The library never
imports its command line (`lfm_ray.cli`).
"""

from lfm_ray.errors import LfmError

__version__ = "0.1.0"
__all__ = ["LfmError", "__version__"]
