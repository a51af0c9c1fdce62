"""segdiff on the Hugging Face Hub: open a model by its id (`segdiff.resolve`), publish one (`publish`)."""

from ..resolve import is_hub_id, model_folder
from .publish import check_repo_id, push

__all__ = ["check_repo_id", "is_hub_id", "model_folder", "push"]
