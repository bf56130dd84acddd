"""Drop-in DeSAP for Hugging Face transformers models (see docs/integrations.md).

    from desap_ops.integrations import apply_desap, remove_desap
    apply_desap(model, keep=64, task_ratio=0.5, merge=True)
"""
from .llava import SUPPORTED, PruneRecord, apply_desap, image_token_counts, last_prune, remove_desap

__all__ = ["apply_desap", "remove_desap", "last_prune", "PruneRecord", "image_token_counts", "SUPPORTED"]
