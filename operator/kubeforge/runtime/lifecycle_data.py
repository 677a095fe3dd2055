"""The data of examples/lifecycle.yaml: a corpus that teaches a tiny model from scratch the arithmetic
format of kubeforge.runtime.rl.tasks, and the addition prompts its RL stage is rewarded on.

The corpus mirrors `tasks.weak_base_model`'s training mix as plain documents, one JSON line each
({"text": "<|bos|>3*2=6"}; the packer appends EOS after every document, so a document reads exactly as
RLJob prompts it: BOS, the prompt, an answer, EOS): multiplication with the right product, and addition
followed mostly by a RANDOM number of the sum's range. A model pre-trained on it reads operands and answers in
the format but barely adds (about 0.1-0.2 reward at temperature 1), so the RL stage's rise in reward is the
RL's own. The ContextExtensionJob trains on the same corpus at longer lengths.

    from kubeforge.runtime import lifecycle_data
    lifecycle_data.upload(s3_client, "s3://kubeforge", workdir)   # -> {"corpus": ..., "prompts": ...}
    python -m kubeforge.runtime.lifecycle_data s3://kubeforge        # the same, from a shell
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from .rl import tasks
from .tinymodel import BOS

CORPUS_KEY = "data/lifecycle/corpus.jsonl"
PROMPTS_KEY = "data/lifecycle/rl-add/add.jsonl"
MAX_OPERAND = 3  # tasks.arithmetic_records' default: 16 addition prompts


def corpus_records(n: int = 20000, max_operand: int = MAX_OPERAND, correct: float = 0.1, multiply: float = 0.5,
                   seed: int = 0) -> list[dict[str, str]]:
    """`n` documents of "a*b=" + product or "a+b=" + (the sum with probability `correct`, else a random
    number in [0, 2 x max_operand]), each starting with the BOS token as the RL prompts do."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
        if rng.random() < multiply:
            out.append({"text": f"{BOS}{a}*{b}={a * b}"})
        else:
            value = a + b if rng.random() < correct else rng.randint(0, 2 * max_operand)
            out.append({"text": f"{BOS}{a}+{b}={value}"})
    return out


def upload(client: Any, bucket_uri: str, workdir: str | Path) -> dict[str, str]:
    """Write the corpus and the RL prompts under an s3:// bucket (or prefix), where examples/lifecycle.yaml
    reads them: <bucket_uri>/data/lifecycle/corpus.jsonl and <bucket_uri>/data/lifecycle/rl-add/.
    Returns {"corpus": uri, "prompts": uri}. Idempotent; takes well under a second."""
    from ..storage import s3 as s3mod

    root = bucket_uri.rstrip("/")
    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    corpus = tasks.write_jsonl(corpus_records(), work / "corpus.jsonl")
    prompts = tasks.write_jsonl(tasks.arithmetic_records(MAX_OPERAND), work / "add.jsonl")
    corpus_uri, prompts_uri = f"{root}/{CORPUS_KEY}", f"{root}/{PROMPTS_KEY}"
    s3mod.put_bytes(client, s3mod.S3Uri.parse(corpus_uri), corpus.read_bytes(), "application/jsonl")
    s3mod.put_bytes(client, s3mod.S3Uri.parse(prompts_uri), prompts.read_bytes(), "application/jsonl")
    return {"corpus": corpus_uri, "prompts": prompts_uri.rsplit("/", 1)[0] + "/"}



if __name__ == "__main__":
    import sys
    import tempfile

    from ..storage import make_client

    with tempfile.TemporaryDirectory() as tmp:
        print(json.dumps(upload(make_client(), sys.argv[1] if len(sys.argv) > 1 else "s3://kubeforge", tmp)))
