"""Test double of SEEM's ``modeling/architectures/seem_model_v1.py`` (``GeneralizedSEEM``).

What ``annotate.seem`` touches is upstream's: ``pixel_mean``/``pixel_std`` buffers (3, 1, 1) on
the 0-255 scale, ``size_divisibility``, ``sem_seg_postprocess_before_inference``, ``backbone``
(image -> feature dict), ``sem_seg_head(features, target_queries=None)`` -> ``pred_logits``
(B, Q, T) (T = number of text embeddings) and ``pred_masks`` (B, Q, H/4, W/4), the language
encoder at ``sem_seg_head.predictor.lang_encoder``, and a buffer built on
``torch.cuda.current_device()``. ``evaluate`` and ``semantic_inference`` follow upstream's
semantic path, as the reference the tests compare with.
"""

import torch
from torch import nn
from torch.nn import functional as F

from ..language import LanguageEncoder
from ..modules import sem_seg_postprocess
from .build import register_model


class Backbone(nn.Module):
    """Upstream: modeling/vision/backbone (FocalNet, DaViT, ...); features at stride 4."""

    size_divisibility = 32

    def __init__(self, dim):
        super().__init__()
        self.stem = nn.Conv2d(3, dim, 4, stride=4)

    def forward(self, x):
        return {"res2": torch.tanh(self.stem(x))}


class Predictor(nn.Module):
    """Upstream: modeling/interface/seem_v1.py (``SEEMDecoder.forward_prediction_heads``):
    class logits = ``lang_encoder.compute_similarity(queries @ class_embed)``, masks =
    einsum of the query mask embeddings with the mask features."""

    def __init__(self, lang_encoder, num_queries, hidden, dim_proj, dim):
        super().__init__()
        self.lang_encoder = lang_encoder
        self.query_feat = nn.Embedding(num_queries, hidden)
        self.image_to_query = nn.Linear(dim, hidden)
        self.class_embed = nn.Parameter(torch.randn(hidden, dim_proj))
        self.mask_embed = nn.Linear(hidden, dim)

    def forward(self, mask_features):
        pooled = self.image_to_query(mask_features.mean(dim=(2, 3)))  # (B, hidden)
        queries = self.query_feat.weight.unsqueeze(0) + pooled.unsqueeze(1)  # (B, Q, hidden)
        outputs_class = self.lang_encoder.compute_similarity(queries @ self.class_embed)
        mask_embed = self.mask_embed(queries)
        outputs_mask = torch.einsum("bqc,bchw->bqhw", mask_embed, mask_features) * 3
        return {"pred_logits": outputs_class, "pred_masks": outputs_mask}


class Head(nn.Module):
    """Upstream: modeling/body/xdecoder_head.py (``XdecoderHead``): pixel decoder, then the
    predictor."""

    def __init__(self, lang_encoder, num_queries, hidden, dim_proj, dim):
        super().__init__()
        self.num_classes = 133  # COCO panoptic, as built from upstream's configs
        self.pixel_decoder = nn.Conv2d(dim, dim, 3, padding=1)
        self.predictor = Predictor(lang_encoder, num_queries, hidden, dim_proj, dim)

    def forward(self, features, mask=None, target_queries=None, task="seg", extra=None):
        return self.predictor(self.pixel_decoder(features["res2"]))


class GeneralizedSEEM(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        dec = cfg["MODEL"]["DECODER"]
        dim = cfg["MODEL"]["ENCODER"]["CONVS_DIM"]
        self.backbone = Backbone(dim)
        self.sem_seg_head = Head(
            LanguageEncoder(cfg),
            dec["NUM_OBJECT_QUERIES"],
            dec["HIDDEN_DIM"],
            cfg["MODEL"]["DIM_PROJ"],
            dim,
        )
        test = dec["TEST"]
        self.semantic_on = test["SEMANTIC_ON"]
        self.panoptic_on = test["PANOPTIC_ON"]
        self.instance_on = test["INSTANCE_ON"]
        self.sem_seg_postprocess_before_inference = (
            test["SEM_SEG_POSTPROCESSING_BEFORE_INFERENCE"]
            or test["PANOPTIC_ON"]
            or test["INSTANCE_ON"]
        )
        size_divisibility = dec["SIZE_DIVISIBILITY"]
        self.size_divisibility = (
            size_divisibility if size_divisibility >= 0 else self.backbone.size_divisibility
        )
        self.register_buffer(
            "pixel_mean", torch.Tensor(cfg["INPUT"]["PIXEL_MEAN"]).view(-1, 1, 1), False
        )
        self.register_buffer(
            "pixel_std", torch.Tensor(cfg["INPUT"]["PIXEL_STD"]).view(-1, 1, 1), False
        )
        # as upstream's from_config: a factory given the current CUDA device
        self.register_buffer(
            "dilation_kernel", torch.ones((1, 1, 3, 3), device=torch.cuda.current_device())
        )

    @property
    def device(self):
        return self.pixel_mean.device

    def evaluate(self, batched_inputs):
        """Upstream's ``evaluate`` restricted to the semantic output: normalise, pad to
        ``size_divisibility`` (detectron2's ``ImageList.from_tensors``), backbone and head,
        upsample the masks to the padded size, then ``semantic_inference`` and
        ``sem_seg_postprocess`` (in the order the flag says) to (height, width)."""
        images = [x["image"].to(self.device) for x in batched_inputs]
        images = [(x - self.pixel_mean) / self.pixel_std for x in images]
        sizes = [tuple(x.shape[-2:]) for x in images]
        div = self.size_divisibility
        hp = max(s[0] for s in sizes)
        wp = max(s[1] for s in sizes)
        if div > 1:
            hp, wp = (hp + div - 1) // div * div, (wp + div - 1) // div * div
        batch = images[0].new_zeros((len(images), 3, hp, wp))
        for img, pad in zip(images, batch, strict=True):
            pad[:, : img.shape[-2], : img.shape[-1]].copy_(img)
        outputs = self.sem_seg_head(self.backbone(batch), target_queries=None)
        mask_pred_results = F.interpolate(
            outputs["pred_masks"], size=(hp, wp), mode="bilinear", align_corners=False
        )
        processed = []
        for mask_cls, mask_pred, inp, size in zip(
            outputs["pred_logits"], mask_pred_results, batched_inputs, sizes, strict=True
        ):
            height, width = inp.get("height", size[0]), inp.get("width", size[1])
            if self.sem_seg_postprocess_before_inference:
                mask_pred = sem_seg_postprocess(mask_pred, size, height, width)
                mask_cls = mask_cls.to(mask_pred)
            r = self.semantic_inference(mask_cls, mask_pred)
            if not self.sem_seg_postprocess_before_inference:
                r = sem_seg_postprocess(r, size, height, width)
            processed.append({"sem_seg": r})
        return processed

    def semantic_inference(self, mask_cls, mask_pred):
        mask_cls = F.softmax(mask_cls, dim=-1)[..., :-1]
        return torch.einsum("qc,qhw->chw", mask_cls, mask_pred.sigmoid())


@register_model
def get_seem_model(cfg, **kwargs):
    return GeneralizedSEEM(cfg)
