"""Loaded at start-up by Python processes that the upstream tests start with this folder first
on ``PYTHONPATH``. Each part is switched on by an environment variable:

- ``CONFORMALSAM_FAKE_CUDA=N``: N simulated CUDA devices on a CPU (``tests/_cuda_sim.py``), so
  that SEEM's CUDA-only code runs here;
- ``CONFORMALSAM_HIDE=a,b``: these modules cannot be imported (``import a`` raises
  ``ModuleNotFoundError``), as when they are not installed;
- ``CONFORMALSAM_TOKENIZED=FILE``: every text a transformers tokenizer is called on with
  ``padding="max_length"`` (as SEEM's text encoder calls it) is appended to FILE, one JSON list
  per call.
"""

import importlib.util
import json
import os
import sys
from pathlib import Path

if os.environ.get("CONFORMALSAM_FAKE_CUDA"):
    _spec = importlib.util.spec_from_file_location(
        "_cuda_sim", Path(__file__).resolve().parents[1] / "_cuda_sim.py"
    )
    _sim = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_sim)
    _sim.install_in_process(int(os.environ["CONFORMALSAM_FAKE_CUDA"]))

for _name in filter(None, os.environ.get("CONFORMALSAM_HIDE", "").split(",")):
    sys.modules[_name] = None

if os.environ.get("CONFORMALSAM_TOKENIZED"):
    from transformers.tokenization_utils_base import PreTrainedTokenizerBase

    _call = PreTrainedTokenizerBase.__call__

    def _recording_call(self, text=None, *args, **kwargs):
        if kwargs.get("padding") == "max_length":
            texts = [text] if isinstance(text, str) else list(text)
            with open(os.environ["CONFORMALSAM_TOKENIZED"], "a", encoding="utf-8") as f:
                f.write(json.dumps(texts) + "\n")
        return _call(self, text, *args, **kwargs)

    PreTrainedTokenizerBase.__call__ = _recording_call
