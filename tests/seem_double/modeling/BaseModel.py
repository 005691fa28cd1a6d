"""Test double of SEEM's ``modeling/BaseModel.py``."""

import torch
import torch.nn as nn
from utils.model import align_and_update_state_dicts


class BaseModel(nn.Module):
    """Wraps the network as ``.model``; ``from_pretrained`` loads a state dict with
    ``map_location=opt["device"]`` and ``strict=False``, as upstream."""

    def __init__(self, opt, module):
        super().__init__()
        self.opt = opt
        self.model = module

    def forward(self, *inputs, **kwargs):
        return self.model(*inputs, **kwargs)

    def from_pretrained(self, load_dir):
        state_dict = torch.load(load_dir, map_location=self.opt["device"])
        state_dict = align_and_update_state_dicts(self.model.state_dict(), state_dict)
        self.model.load_state_dict(state_dict, strict=False)
        return self
