"""Test double of SEEM's ``modeling/modules/postprocessing.py`` (``sem_seg_postprocess``)."""

from torch.nn import functional as F


def sem_seg_postprocess(result, img_size, output_height, output_width):
    """(C, H, W) -> crop to ``img_size`` -> bicubic (antialiased) to the output size."""
    result = result[:, : img_size[0], : img_size[1]].expand(1, -1, -1, -1)
    return F.interpolate(
        result,
        size=(output_height, output_width),
        mode="bicubic",
        align_corners=False,
        antialias=True,
    )[0]
