"""Test double of SEEM's ``utils/prompt_engineering.py`` (a few of its templates)."""


def get_prompt_templates():
    return ["a photo of a {}.", "a bad photo of the {}.", "a {} in a scene."]
