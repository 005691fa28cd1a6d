"""Test double of SEEM's ``utils/model.py`` (``align_and_update_state_dicts``)."""

from utils.distributed import is_main_process  # noqa: F401  (upstream's import, see there)


def align_and_update_state_dicts(model_state_dict, ckpt_state_dict):
    """The checkpoint entries whose name and shape match the model's; the rest is ignored."""
    return {
        k: v
        for k, v in ckpt_state_dict.items()
        if k in model_state_dict and model_state_dict[k].shape == v.shape
    }
