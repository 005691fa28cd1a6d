"""Test double of SEEM's ``modeling/language/vlpencoder.py`` (``LanguageEncoder``) and of
``build_tokenizer`` in ``modeling/language/LangEncoder/__init__.py``."""

import torch
from torch import nn
from transformers import CLIPTokenizer
from utils.prompt_engineering import get_prompt_templates


def build_tokenizer(config_encoder):
    """As upstream for TOKENIZER "clip": the hub's openai/clip-vit-base-patch32 unless
    PRETRAINED_TOKENIZER names another (a local folder), with cls_token = eos_token."""
    name = config_encoder.get("PRETRAINED_TOKENIZER", "openai/clip-vit-base-patch32")
    tokenizer = CLIPTokenizer.from_pretrained(name)
    tokenizer.add_special_tokens({"cls_token": tokenizer.eos_token})
    return tokenizer


class LanguageEncoder(nn.Module):
    """Prompt texts -> normalised embeddings; ``compute_similarity`` gives the class logits."""

    def __init__(self, cfg):
        super().__init__()
        text = cfg["MODEL"]["TEXT"]
        self.tokenizer = build_tokenizer(text)
        self.tokenizer_type = text["TOKENIZER"]
        self.max_token_num = text["CONTEXT_LENGTH"]
        # upstream: a CLIP text transformer (LangEncoder/transformer.py); here an embedding
        # averaged over the real tokens
        self.lang_encoder = nn.Embedding(len(self.tokenizer), text["WIDTH"])
        self.lang_proj = nn.Parameter(torch.randn(text["WIDTH"], cfg["MODEL"]["DIM_PROJ"]) * 0.5)
        self.logit_scale = nn.Parameter(torch.tensor(2.0))

    def get_text_embeddings(self, class_names, name="default", is_eval=False, prompt=True):
        """The ``is_eval`` branch of upstream: each name, with "-other", "-merged" and
        "-stuff" removed, through the prompt templates, the token ids and attention masks sent
        with ``.cuda()`` (the current CUDA device), the template embeddings averaged and
        normalised; stored as ``{name}_text_embeddings``."""
        assert is_eval, "the test double mirrors only the is_eval branch"
        with torch.no_grad():

            def extract_mean_emb(txts):
                tokens = self.tokenizer(
                    txts,
                    padding="max_length",
                    truncation=True,
                    max_length=self.max_token_num,
                    return_tensors="pt",
                )
                emb = self.forward_language(
                    (tokens["input_ids"].cuda(), tokens["attention_mask"].cuda())
                )
                emb = emb.mean(dim=0)
                return emb / emb.norm()

            templates = get_prompt_templates() if prompt else ["{}"]
            embs = []
            for c in class_names:
                c = c.replace("-other", "").replace("-merged", "").replace("-stuff", "")
                embs.append(extract_mean_emb([t.format(c) for t in templates]))
            setattr(self, f"{name}_text_embeddings", torch.stack(embs, dim=0))

    def forward_language(self, texts, norm=True):
        ids, mask = texts
        m = mask.unsqueeze(-1).to(self.lang_proj.dtype)
        x = (self.lang_encoder(ids) * m).sum(1) / m.sum(1).clamp_min(1)
        x = x @ self.lang_proj
        return x / (x.norm(dim=-1, keepdim=True) + 1e-7) if norm else x

    def compute_similarity(self, v_emb, name="default"):
        """(B, Q, D) query embeddings -> (B, Q, T) logits against the stored text embeddings."""
        v_emb = v_emb / (v_emb.norm(dim=-1, keepdim=True) + 1e-7)
        t_emb = getattr(self, f"{name}_text_embeddings")
        return self.logit_scale.exp() * v_emb @ t_emb.unsqueeze(0).transpose(1, 2)
