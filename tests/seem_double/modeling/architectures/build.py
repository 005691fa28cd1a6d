"""Test double of SEEM's ``modeling/architectures/build.py``: models registered under the
last part of their module name, chosen by ``MODEL.NAME``."""

_model_entrypoints = {}


def build_model(config, **kwargs):
    model_name = config["MODEL"]["NAME"]
    if model_name not in _model_entrypoints:
        raise ValueError(f"Unkown model: {model_name}")
    return _model_entrypoints[model_name](config, **kwargs)


def register_model(fn):
    _model_entrypoints[fn.__module__.split(".")[-1]] = fn
    return fn
