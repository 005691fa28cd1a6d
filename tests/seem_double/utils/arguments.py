"""Test double of SEEM's ``utils/arguments.py`` (``load_opt_from_config_files``)."""

import yaml


def load_opt_from_config_files(conf_files):
    """Merge the YAML files into one dict, later files overriding earlier ones."""
    opt = {}
    for conf_file in conf_files:
        with open(conf_file, encoding="utf-8") as f:
            opt.update(yaml.safe_load(f))
    return opt
