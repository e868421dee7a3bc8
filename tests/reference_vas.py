"""A deliberately simple VAS reference: HF transformers, no cache, a plain greedy loop.

For every step and every candidate a, V(s + [a]) is recomputed from scratch. Nothing here is
shared with vas_server's runtime except the checkpoint files it reads.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM


class ReferenceValueModel:
    def __init__(self, path: str, base_dir: str):
        path = Path(path)
        spec = json.loads((path / "vas.json").read_text())
        trunk = spec["trunk"]
        src = base_dir if trunk["type"] == "base_prefix" else path / "trunk"
        lm = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()
        if trunk.get("num_layers"):
            # The config keeps its layer count: Gemma 4's per-layer inputs are shaped by it, and
            # every decoder runs only the layers its list holds.
            lm.model.layers = lm.model.layers[: trunk["num_layers"]]
        self.model = lm.model
        self.heads = {h["name"]: h["kind"] for h in spec["heads"]}
        self.tensors = load_file(str(path / "heads.safetensors"))

    @torch.no_grad()
    def last_hidden(self, tokens: list[int]) -> torch.Tensor:
        return self.model(torch.tensor([tokens])).last_hidden_state[0, -1]

    @torch.no_grad()
    def values(self, head: str, prefix: list[int], candidates: list[int]) -> torch.Tensor:
        t = self.tensors
        if self.heads[head] == "state":
            return torch.stack([self.last_hidden(prefix + [a]) @ t[f"{head}.weight"] + t[f"{head}.bias"]
                                for a in candidates])
        h = self.last_hidden(prefix)
        embed = self.model.get_input_embeddings().weight
        baseline = h @ t[f"{head}.baseline"] if f"{head}.baseline" in t else 0.0
        return torch.stack([baseline + (h @ t[f"{head}.proj"]) @ embed[a] + t[f"{head}.bias"][a] for a in candidates])


@torch.no_grad()
def reference_greedy(base_dir: str, value_models: dict[str, ReferenceValueModel], weights: dict[str, float],
                     prompt: list[int], max_tokens: int, top_k: int = 20) -> list[int]:
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    head_owner = {h: vm for vm in value_models.values() for h in vm.heads}
    s = list(prompt)
    out = []
    for _ in range(max_tokens):
        logits = base(torch.tensor([s])).logits[0, -1].float()
        top = torch.topk(logits, top_k)
        candidates = top.indices.tolist()
        new = top.values.clone()
        for head, w in weights.items():
            q = head_owner[head].values(head, s, candidates)
            new += w * (q - q.mean())
        steered = logits.clone()  # tokens outside C keep their logit
        steered[top.indices] = new
        token = int(torch.argmax(steered))
        out.append(token)
        s.append(token)
    return out  # like vLLM with ignore_eos=True
