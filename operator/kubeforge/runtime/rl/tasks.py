"""A verifiable task small enough to learn on CPU: single-digit addition, and a base model that knows the
answer format (a number, then EOS) but barely addition, so nearly every gain in reward is the RL's.

`arithmetic_prompts` writes the prompt records RLJob reads ({"prompt": "3+4=", "reference": "7"});
`weak_base_model` trains a tiny Llama with the byte tokenizer on multiplication ("a*b=" + product) and on
"a+b=" followed mostly (90%) by a RANDOM number of the sum's range: it reads operands and answers in the
format (a number, then EOS), and scores little above chance on addition.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any


def arithmetic_records(max_operand: int = 3, seed: int = 0) -> list[dict[str, str]]:
    pairs = [(a, b) for a in range(max_operand + 1) for b in range(max_operand + 1)]
    random.Random(seed).shuffle(pairs)
    return [{"prompt": f"{a}+{b}=", "reference": str(a + b)} for a, b in pairs]


def write_jsonl(records: list[dict[str, Any]], path: str | Path) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text("".join(json.dumps(r) + "\n" for r in records))
    return p


def weak_base_model(out: str | Path, max_operand: int = 3, steps: int = 300, correct: float = 0.1,
                    multiply: float = 0.5, seed: int = 0, **config_overrides: Any) -> Path:
    """A tiny Llama trained on "a*b=" with the right product (a fraction `multiply` of the examples) and
    on "a+b=" followed by the right sum with probability `correct`, else a uniformly random number in
    [0, 2 x max_operand], then EOS. It reads operands (multiplication needs them), knows the answer format and
    barely addition: sampled at temperature 1 it scores about 0.13 on the addition task (chance is 1/7).
    Without that small head start (correct=0), GRPO on a 64-wide model often collapses some prompts onto a
    wrong answer and plateaus near 0.5."""
    import torch

    from ..tinymodel import build_model, byte_tokenizer, tiny_llama_config

    tok = byte_tokenizer()
    model = build_model(tiny_llama_config(**config_overrides), seed=seed)
    rng = random.Random(seed)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    bos, eos, pad = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    model.train()
    for _ in range(steps):
        rows, masks = [], []
        for _ in range(64):
            a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
            op = "*" if rng.random() < multiply else "+"
            prompt = [bos, *tok.encode(f"{a}{op}{b}=", add_special_tokens=False)]
            if op == "*":
                value = a * b
            else:
                value = a + b if rng.random() < correct else rng.randint(0, 2 * max_operand)
            answer = [*tok.encode(str(value), add_special_tokens=False), eos]
            rows.append(prompt + answer)
            masks.append([0] * len(prompt) + [1] * len(answer))
        width = max(len(r) for r in rows)
        ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
        lmask = torch.tensor([m + [0] * (width - len(m)) for m in masks], dtype=torch.float32)
        logits = model(input_ids=ids[:, :-1]).logits
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1),
                                                reduction="none").view(ids.size(0), -1)
        loss = (nll * lmask[:, 1:]).sum() / lmask[:, 1:].sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def upload(client: Any, bucket_uri: str, workdir: str | Path) -> tuple[str, str]:
    """Write the base model and the prompts under an s3:// bucket (or prefix): models/rl-tiny-base and
    data/rl-add/add.jsonl, the URIs examples/rl-tiny.yaml reads. Returns (model uri, data uri)."""
    from ...storage import s3 as s3mod

    root = bucket_uri.rstrip("/")
    model_uri, data_uri = f"{root}/models/rl-tiny-base", f"{root}/data/rl-add/"
    model_dir = weak_base_model(Path(workdir) / "rl-tiny-base")
    s3mod.upload_dir(client, model_dir, model_uri)
    prompts = write_jsonl(arithmetic_records(), Path(workdir) / "add.jsonl")
    s3mod.put_bytes(client, s3mod.S3Uri.parse(data_uri + "add.jsonl"), prompts.read_bytes(), "application/jsonl")
    return model_uri, data_uri


if __name__ == "__main__":
    import sys
    import tempfile

    from ...storage import make_client

    with tempfile.TemporaryDirectory() as tmp:
        print(*upload(make_client(), sys.argv[1] if len(sys.argv) > 1 else "s3://kubeforge", tmp))
